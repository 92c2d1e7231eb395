"""A registered version runs where sav-ray is not installed: `mlflow models predict` in an
environment with the model's requirements but no sav-ray gives jobs/predict.py's labels.

The environment is a throwaway venv whose site-packages holds one `.pth` line naming this
venv's site-packages: a path line adds that folder to sys.path without running the `.pth` files
in it, so the editable install's finder for sav_ray is never installed there.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import pytest
import yaml

from sav_ray.tracking import registry
from sav_ray.tracking import runs as tracking

ROOT = Path(__file__).resolve().parents[1]
NAME = "portable"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=]+)$")


def canonical(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def test_requirements_pin_the_runtime_dependencies_and_not_sav_ray():
    pins = registry.pip_requirements()
    assert all(PIN.match(p) for p in pins), pins
    names = [canonical(PIN.match(p).group(1)) for p in pins]
    assert "sav-ray" not in names
    for needed in ("torch", "transformers", "mlflow", "safetensors", "numpy", "pillow"):
        assert needed in names
    # predicting imports neither Ray nor the plots nor the server's upload parser
    assert not {"ray", "matplotlib", "python-multipart"} & set(names)
    torch_pin = pins[names.index("torch")]
    assert torch_pin == f"torch=={version('torch').split('+')[0]}"


@pytest.fixture
def own_store(tmp_path, monkeypatch):
    """A sqlite store in tmp_path, for this test only (the session's store is put back)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.use_store(uri)
    yield uri
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def check_requirements(model_dir: Path) -> None:
    """requirements.txt: `name==version` of installed distributions (local labels such as
    torch's `+cpu` dropped), none of them sav-ray; conda.yaml does not name it either."""
    lines = (model_dir / "requirements.txt").read_text().split()
    assert lines
    for line in lines:
        m = PIN.match(line)
        assert m, f"requirements.txt line {line!r} is not name==version"
        dist, pinned = m.groups()
        assert canonical(dist) != "sav-ray", line
        try:
            installed = version(dist)
        except PackageNotFoundError:
            pytest.fail(f"requirements.txt names {dist}, which is not installed")
        assert pinned == installed.split("+")[0], line
    assert not re.search(r"sav[-_]ray", (model_dir / "conda.yaml").read_text(), re.I)


def check_code(model_dir: Path) -> None:
    """The package's source is the model's code/sav_ray, without bytecode."""
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["code"] == "code"
    code = model_dir / "code" / "sav_ray"
    assert (code / "__init__.py").is_file() and (code / "core" / "classify.py").is_file()
    assert (code / "schema" / "sav.schema.json").is_file()
    assert not [p for p in code.rglob("*") if p.name == "__pycache__" or p.suffix == ".pyc"]


def bare_venv(where: Path) -> Path:
    """A venv that sees this venv's packages through a `.pth` path line but not sav_ray: its
    python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    Path(site, "main-venv.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


def imported(stderr: str) -> set[str]:
    """The modules `python -X importtime` reports on stderr."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    } - {"imported package"}


@pytest.mark.slow
def test_a_registered_version_predicts_where_sav_ray_is_not_installed(
    own_store, demo_sav, small_data, tmp_path
):
    _, out, artifact = demo_sav
    with tracking.run("test-portable", own_store, "register"):
        mv = registry.register_artifact(NAME, artifact, out)
    assert str(mv.version) == "1"
    ref = f"models:/{NAME}/1"
    model_dir = registry.download_artifact(ref, tmp_path / "download", own_store).parents[1]
    check_requirements(model_dir)
    check_code(model_dir)

    # an environment with the dependencies and no sav-ray, run away from the checkout
    python = bare_venv(tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "RAY_ADDRESS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(MLFLOW_TRACKING_URI=own_store, HF_HUB_OFFLINE="1")
    probe = subprocess.run(
        [str(python), "-c", "import mlflow, torch, transformers\nimport sav_ray"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 1, probe.stderr
    assert "No module named 'sav_ray'" in probe.stderr, probe.stderr

    rows = [json.loads(line) for line in Path(small_data["test"]).read_text().splitlines()]
    folder = Path(small_data["test"]).parent
    payload = {
        "dataframe_split": {
            "columns": ["text", "image"],
            "data": [
                [r["question"], base64.b64encode((folder / r["image"]).read_bytes()).decode()]
                for r in rows
            ],
        }
    }
    (tmp_path / "input.json").write_text(json.dumps(payload))
    served = tmp_path / "predictions.json"
    # -X importtime: every module the CLI imports, on stderr
    proc = subprocess.run(
        [str(python), "-X", "importtime", "-m", "mlflow", "models", "predict", "-m", ref,
         "--env-manager", "local", "-i", str(tmp_path / "input.json"), "-t", "json",
         "-o", str(served)],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    errors = "\n".join(line for line in proc.stderr.splitlines() if "import time:" not in line)
    assert proc.returncode == 0, errors[-4000:]
    got = json.loads(served.read_text())["predictions"]
    modules = imported(proc.stderr)
    ours = {m for m in modules if m.split(".")[0] == "sav_ray"}
    assert "sav_ray.core.classify" in ours  # the logged copy: nothing else is importable
    assert all(m in ("sav_ray", "sav_ray.core") or m.startswith("sav_ray.core.") for m in ours)
    assert not {"ray", "matplotlib"} & {m.split(".")[0] for m in modules}

    # the product's batch prediction of the same rows from the same version
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths
    preds = tmp_path / "preds.jsonl"
    try:
        job = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / "predict.py"), "--artifact", ref,
             "--data", str(small_data["test"]), "--output", str(preds)],
            env={**env, "RAY_TMPDIR": str(ray_tmp)}, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert job.returncode == 0, job.stderr[-4000:]
    want = sorted((json.loads(line) for line in preds.read_text().splitlines()),
                  key=lambda r: r["row"])  # fmt: skip
    assert len(got) == len(want) == len(rows)
    assert [p["label"] for p in got] == [p["label"] for p in want]
    assert [p["votes"] for p in got] == [p["votes"] for p in want]
    for g, w in zip(got, want, strict=True):
        assert g["probabilities"].keys() == w["probabilities"].keys()
        assert all(abs(p - w["probabilities"][k]) <= 1e-6 for k, p in g["probabilities"].items())
    assert {p["label"] for p in got} <= set(artifact.labels)
