"""Tracking store choice, registration as a pyfunc logged from code, loading back, failed fits."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from sav_ray.cli import fit as fit_job
from sav_ray.core.artifact import SCHEMA_VERSION
from sav_ray.core.classify import predict_examples
from sav_ray.core.errors import ConfigError
from sav_ray.pipelines.config import FitConfig
from sav_ray.tracking import registry
from sav_ray.tracking import runs as tracking

ROOT = Path(__file__).resolve().parents[1]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def test_tracking_uri_flag_then_environment_then_embedded_default(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri("sqlite:////x/flag.db") == "sqlite:////x/flag.db"
    assert tracking.tracking_uri() == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    default = tracking.tracking_uri()
    db = tracking.sqlite_path(default)
    assert db.is_absolute() and db == ROOT / "data" / "mlflow" / "mlflow.db"


def test_inside_a_ray_job_relative_stores_and_outputs_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(tracking.RAY_JOB_ENV, "{}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI.*--tracking-uri"):
        tracking.tracking_uri()
    with pytest.raises(ConfigError, match="--tracking-uri 'sqlite:///rel.db' is a relative"):
        tracking.tracking_uri("sqlite:///rel.db")
    assert tracking.tracking_uri(f"sqlite:///{tmp_path}/m.db") == f"sqlite:///{tmp_path}/m.db"
    with pytest.raises(ConfigError, match="--output out/sav: a relative path"):
        tracking.check_job_outputs(FitConfig(output="out/sav"))
    with pytest.raises(ConfigError, match="--save-vectors vec: a relative path"):
        tracking.check_job_outputs(FitConfig(output=str(tmp_path), save_vectors="vec"))
    tracking.check_job_outputs(FitConfig(output=str(tmp_path / "sav")))
    monkeypatch.delenv(tracking.RAY_JOB_ENV)
    tracking.check_job_outputs(FitConfig(output="out/sav"))  # fine outside a job


@pytest.fixture(scope="module")
def registered(demo_sav):
    """A fresh model with one version of demo_sav, registered inside a run."""
    _, out, artifact = demo_sav
    name = unique("reg")
    uri = tracking.use_store()
    with tracking.run("test-registry", uri, "register") as active:
        mv = registry.register_artifact(name, artifact, out)
    return name, mv, active.info.run_id


def test_new_version_has_the_candidate_alias_and_artifact_tags(registered, demo_sav):
    name, mv, run_id = registered
    artifact = demo_sav[2]
    assert mv.aliases == ["candidate"] and mv.run_id == run_id
    c = registry.client()
    expected = {
        "base_model": artifact.base_model.name_or_path,
        "revision": artifact.base_model.revision,
        "schema_version": str(SCHEMA_VERSION),
        "selection": "paper",
        "k": "10",
    }
    assert {k: c.get_registered_model(name).tags.get(k) for k in expected} == expected
    assert mv.tags["artifact_digest"] == artifact.digest
    assert json.loads(mv.tags["labels"]) == artifact.labels


def test_alias_and_version_refs_load_through_the_one_loader(registered, demo_sav):
    name, mv, _ = registered
    artifact = demo_sav[2]
    for ref in (f"models:/{name}@candidate", f"models:/{name}/{mv.version}"):
        loaded = registry.load_artifact_ref(ref, expect=artifact.base_model)
        assert loaded.digest == artifact.digest
        assert loaded.heads.tolist() == artifact.heads.tolist()


def test_logged_model_holds_the_artifact_and_no_pickle(registered, tmp_path):
    name, mv, _ = registered
    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/{name}@candidate", dst_path=str(tmp_path))
    )
    names = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "pyfunc_model.py", "artifacts/sav/sav.json"} <= names
    assert "artifacts/sav/centroids.safetensors" in names
    assert not [n for n in names if n.endswith((".pkl", ".pickle", ".cloudpickle"))]
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in flavor  # the key of a pickled python model
    for p in local.rglob("*"):  # a pickle (protocol >= 2) starts with byte 0x80
        if p.is_file() and p.suffix != ".safetensors":
            assert p.read_bytes()[:1] != b"\x80", p
    assert registry.download_artifact(f"models:/{name}@candidate", tmp_path / "again").is_dir()


def test_pyfunc_predictions_equal_predict_examples(
    registered, demo_sav, small_data, manifest_examples
):
    name, _, _ = registered
    lm, _, artifact = demo_sav
    model = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    rows = [json.loads(line) for line in Path(small_data["test"]).read_text().splitlines()]
    folder = Path(small_data["test"]).parent
    frame = pd.DataFrame(
        {"text": [r["question"] for r in rows], "image": [b64(folder / r["image"]) for r in rows]}
    )
    out = model.predict(frame)
    examples, _ = manifest_examples(small_data["test"])
    expected = predict_examples(lm, artifact, examples)
    assert list(out["label"]) == [p.label for p in expected]
    assert list(out["votes"]) == [p.votes for p in expected]
    assert list(out["scores"]) == [p.scores for p in expected]
    for got, want in zip(out["probabilities"], expected, strict=True):
        assert got.keys() == want.probabilities.keys()
        assert all(abs(got[k] - want.probabilities[k]) <= 1e-6 for k in got)
        assert abs(sum(got.values()) - 1) <= 1e-6
    text_only = model.predict(pd.DataFrame({"text": ["no image here"]}))
    assert text_only["label"][0] in artifact.labels
    with pytest.raises(Exception, match="input row 0: field 'image' is not base64"):
        model.predict(pd.DataFrame({"text": ["x"], "image": ["not base64!"]}))


def test_bad_references_say_what_is_wrong(registered):
    name, _, _ = registered
    with pytest.raises(registry.RegistryError, match="models:/NAME@ALIAS or models:/NAME/VERSION"):
        registry.load_artifact_ref("models:/just-a-name")
    with pytest.raises(registry.RegistryError, match="has no alias 'production'.*candidate"):
        registry.load_artifact_ref(f"models:/{name}@production")
    with pytest.raises(registry.RegistryError, match="has no version 99"):
        registry.load_artifact_ref(f"models:/{name}/99")
    with pytest.raises(registry.RegistryError, match="no registered model 'nope-"):
        registry.load_artifact_ref(f"models:/{unique('nope')}@candidate")


def test_failed_registration_fails_the_run_and_leaves_no_version(demo_sav):
    _, out, artifact = demo_sav
    name = unique("broken")
    uri = tracking.use_store()
    # "latest" is a reserved alias: the version exists when setting the alias fails
    with (
        pytest.raises(Exception, match="reserved"),
        tracking.run("test-registry", uri, "bad") as active,
    ):
        registry.register_artifact(name, artifact, out, alias="latest")
    c = registry.client()
    run = c.get_run(active.info.run_id)
    assert run.info.status == "FAILED" and "reserved" in run.data.tags["sav.error"]
    assert not c.search_model_versions(f"name = '{name}'")


def test_fit_job_with_a_missing_image_stops_before_any_run_and_registers_nothing(
    demo_model_dir, small_data, tmp_path, capsys
):
    rows = [json.loads(line) for line in Path(small_data["train"]).read_text().splitlines()]
    folder = Path(small_data["train"]).parent
    for r in rows:
        r["image"] = str(folder / r["image"])
    rows[4]["image"] = str(tmp_path / "gone.png")
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    name, experiment = unique("missing"), unique("exp")
    code = fit_job.main(
        ["--model", str(demo_model_dir), "--train", str(manifest), "--register", name,
         "--experiment", experiment, "--num-heads", "5"]
    )  # fmt: skip
    assert code == 2
    assert "row 5" in capsys.readouterr().err
    c = registry.client()
    assert not c.search_model_versions(f"name = '{name}'")
    # the manifest is checked before the model, Ray and MLflow: no run is opened at all
    found = c.get_experiment_by_name(experiment)
    assert found is None or not c.search_runs([found.experiment_id])


def test_register_refuses_names_that_break_model_uris():
    with pytest.raises(ConfigError, match="--register 'a/b'"):
        registry.check_model_name("a/b")
    registry.check_model_name(None)
