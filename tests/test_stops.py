"""A fit stopped by SIGTERM (a scheduler, `kill`) or SIGINT (Ctrl-C) ends its MLflow run
KILLED, leaves no registry version and no artifact, and exits 128 + the signal. The same
through `ray job stop` is in tests/test_cluster_job.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float) -> list[str]:
    """Read `proc`'s stdout until a line holds `text`; the lines read (bounded wait)."""
    lines: list[str] = []
    found, ended = threading.Event(), threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if text in line:
                found.set()
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.is_set() and not ended.is_set() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not found.is_set():
        proc.kill()
        pytest.fail(f"no line with {text!r} (within {timeout}s):\n{''.join(lines)[-3000:]}")
    return lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signalled_fit_ends_killed_with_nothing_left(
    sig, demo_model_dir, big_manifest, mlflow_store, stopped_cleanly, tmp_path
):
    name, experiment = f"stopped-{uuid.uuid4().hex[:6]}", f"stopped-{uuid.uuid4().hex[:6]}"
    output = tmp_path / "sav"
    cmd = [
        sys.executable, "jobs/fit.py", "--model", str(demo_model_dir), "--train",
        str(big_manifest), "--output", str(output), "--register", name, "--experiment",
        experiment, "--tracking-uri", mlflow_store, "--batch-size", "2",
    ]  # fmt: skip
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray puts sockets in it
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        lines = wait_for_line(proc, "model actors", timeout=120)
        time.sleep(3)  # inside the fit: the run is open, the actors are capturing
        assert proc.poll() is None, "the fit ended before it could be stopped"
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = "".join(lines)
    assert code == 128 + sig, out[-3000:]
    assert f"stopped by {sig.name}" in out
    assert "Traceback" not in out
    stopped_cleanly(mlflow_store, experiment, name, output, sig.name)
