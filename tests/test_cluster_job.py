"""The cluster path: `ray start --head` on loopback, `ray job submit` of jobs/fit.py --register,
against the session's sqlite store and against a real `mlflow server`; a broken row fails the job;
`ray job stop` on a running fit leaves the store clean.

Every process started here runs in its own session and is stopped by its process group;
`ray stop` is not used because it stops every Ray on the machine, not only this one.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from sav_ray.cli import predict as predict_job
from sav_ray.tracking import registry
from sav_ray.tracking import runs as tracking

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow

JOB_TIMEOUT = 420  # seconds for one submitted fit, start to end (2 shared cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM to the process group we started, SIGKILL to what is left of it after `grace`."""
    deadline = time.monotonic() + grace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or the group never empties
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        deadline = time.monotonic() + 10
    proc.wait(timeout=10)


def child_env() -> dict[str, str]:
    return dict(
        os.environ,
        RAY_AUTH_MODE="disabled",  # a local ray.init() may have left a token that turns auth on
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",  # `python` in the job is the venv's
    )


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with every port chosen free; yields the dashboard URL."""
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray puts sockets in it
    ports = {
        name: free_port()
        for name in (
            "port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
            "node-manager-port", "object-manager-port",
        )
    }  # fmt: skip
    log = temp.with_suffix(".log")
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2",
        "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
        "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp), "--disable-usage-stats",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]  # fmt: skip
    with open(log, "w") as out:
        head = subprocess.Popen(
            cmd, env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        wait_for(f"{url}/api/version", 90, head, log)
        yield url
    finally:
        stop_group(head, grace=5)  # nothing to save: its jobs are over
        shutil.rmtree(temp, ignore_errors=True)
        log.unlink(missing_ok=True)


class Server:
    """A started `mlflow server`; `url` waits (bounded) until it answers on /health."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self._url, self.log, self.ready = proc, url, log, False

    @property
    def url(self) -> str:
        if not self.ready:
            wait_for(f"{self._url}/health", 120, self.proc, self.log)
            self.ready = True
        return self._url


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite backend, proxied artifacts) on 127.0.0.1. It is not
    waited for here: it takes half a minute to start, while the Ray head starts and runs a job."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = folder / "server.log"
    cmd = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination", str(folder / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with open(log, "w") as out:
        server = subprocess.Popen(
            cmd, env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield Server(server, f"http://127.0.0.1:{port}", log)
    finally:
        stop_group(server)


def submit(head: str, uri: str, *fit_args: str) -> subprocess.CompletedProcess:
    """`ray job submit` of jobs/fit.py with the working dir uploaded; waits for the job's end."""
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}}
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", head, "--working-dir", str(ROOT),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "jobs/fit.py", *fit_args,
    ]  # fmt: skip
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT)


def absolute_rows(manifest: Path) -> list[dict]:
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for r in rows:
        r["image"] = str(manifest.parent / r["image"])
    return rows


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_submitted_fit_registers_a_candidate_that_predicts_like_predict_py(
    store, mlflow_server, ray_head, mlflow_store, local_ray, demo_model_dir, small_data,
    tmp_path, monkeypatch,
):  # fmt: skip
    uri = mlflow_store if store == "sqlite" else mlflow_server.url
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    name = f"cluster-{store}-{uuid.uuid4().hex[:6]}"
    job = submit(
        ray_head, uri, "--model", str(demo_model_dir), "--train", str(small_data["train"]),
        "--register", name, "--num-heads", "10", "--experiment", f"cluster-{store}",
    )  # fmt: skip
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert f"registered models:/{name}/1 (alias candidate)" in job.stdout

    ref = f"models:/{name}@candidate"
    version = registry.model_version(ref, uri)
    artifact = registry.load_artifact_ref(ref, uri=uri)  # the project's one loader
    assert version.tags["artifact_digest"] == artifact.digest
    assert version.tags["k"] == "10" and len(artifact.heads) == 10
    c = registry.client(uri)
    fit_run = c.get_run(version.run_id)
    assert fit_run.info.status == "FINISHED"
    assert fit_run.data.params["register"] == name
    assert fit_run.data.metrics["train_accuracy"] > 0.5
    assert fit_run.data.metrics["examples"] == 18
    files = {f.path for f in c.list_artifacts(version.run_id)}
    assert {"head_scores.png", "sav"} <= files

    preds = tmp_path / "preds.jsonl"
    assert (
        predict_job.main(
            ["--artifact", ref, "--data", str(small_data["test"]), "--output", str(preds)]
        )
        == 0
    )
    expected = [json.loads(line) for line in preds.read_text().splitlines()]

    tracking.use_store()
    model = mlflow.pyfunc.load_model(ref)
    rows = absolute_rows(Path(small_data["test"]))
    frame = pd.DataFrame(
        {
            "text": [r["question"] for r in rows],
            "image": [base64.b64encode(Path(r["image"]).read_bytes()).decode() for r in rows],
        }
    )
    out = model.predict(frame)
    assert list(out["label"]) == [r["label"] for r in expected]
    assert list(out["votes"]) == [r["votes"] for r in expected]
    assert list(out["scores"]) == [r["scores"] for r in expected]


def test_a_broken_row_fails_the_job_and_its_run_and_registers_nothing(
    ray_head, mlflow_store, demo_model_dir, small_data, tmp_path
):
    rows = absolute_rows(Path(small_data["train"]))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but not really a png")
    rows[7]["image"] = str(broken)  # row 8 of 18: it fails inside the Ray pipeline
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    name, experiment = f"broken-{uuid.uuid4().hex[:6]}", f"broken-{uuid.uuid4().hex[:6]}"
    job = submit(
        ray_head, mlflow_store, "--model", str(demo_model_dir), "--train", str(manifest),
        "--register", name, "--num-heads", "10", "--experiment", experiment,
    )  # fmt: skip
    output = job.stdout + job.stderr
    assert job.returncode != 0, output[-4000:]
    assert "error: row 8:" in output and "broken.png" in output, output[-4000:]

    c = registry.client(mlflow_store)
    assert not c.search_model_versions(f"name = '{name}'")
    (run,) = c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FAILED"
    assert "row 8" in run.data.tags["sav.error"]


def ray_job(head: str, command: str, *args: str) -> subprocess.CompletedProcess:
    """`ray job COMMAND --address HEAD ARGS...` (for submit, ARGS end with `-- entrypoint`)."""
    cmd = [str(BIN / "ray"), "job", command, "--address", head, *args]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120)


def test_ray_job_stop_on_a_running_fit_leaves_the_store_clean(
    ray_head, mlflow_store, demo_model_dir, big_manifest, stopped_cleanly, tmp_path
):
    name, experiment = f"jobstop-{uuid.uuid4().hex[:6]}", f"jobstop-{uuid.uuid4().hex[:6]}"
    output = tmp_path / "sav"
    job_id = f"fit-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_store, "HF_HUB_OFFLINE": "1"}}
    submitted = ray_job(
        ray_head, "submit", "--no-wait", "--submission-id", job_id, "--working-dir", str(ROOT),
        "--runtime-env-json", json.dumps(runtime_env), "--", "python", "jobs/fit.py",
        "--model", str(demo_model_dir), "--train", str(big_manifest), "--output", str(output),
        "--register", name, "--experiment", experiment, "--batch-size", "2",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    deadline = time.monotonic() + JOB_TIMEOUT
    logs = ""
    while "model actors" not in logs:  # the fit has begun: its run is open
        assert time.monotonic() < deadline, f"the fit did not start:\n{logs[-3000:]}"
        status = ray_job(ray_head, "status", job_id).stdout
        assert "RUNNING" in status or "PENDING" in status, status + logs[-3000:]
        time.sleep(1)
        logs = ray_job(ray_head, "logs", job_id).stdout
    time.sleep(3)
    stopped = ray_job(ray_head, "stop", job_id)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    while "was stopped" not in (status := ray_job(ray_head, "status", job_id).stdout):
        assert time.monotonic() < deadline, status
        time.sleep(1)
    logs = ray_job(ray_head, "logs", job_id).stdout
    assert "stopped by SIGTERM" in logs, logs[-3000:]
    stopped_cleanly(mlflow_store, experiment, name, output, "SIGTERM")
