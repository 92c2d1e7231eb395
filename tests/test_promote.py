"""jobs/promote.py: alias moves gated on the eval.* tags, who/when tags, rollback."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from sav_ray.cli import promote as promote_job
from sav_ray.tracking import registry
from sav_ray.tracking import runs as tracking

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(demo_sav):
    """A fresh registered model with three versions of demo_sav (the last one is `candidate`)."""
    _, out, artifact = demo_sav
    name = f"promo-{uuid.uuid4().hex[:8]}"
    uri = tracking.use_store()
    with tracking.run("test-promote", uri, "register"):
        for _ in range(3):
            registry.register_artifact(name, artifact, out)
    return name


def evaluated(name: str, version: str, accuracy: float, data: str = "abc") -> None:
    tags = {registry.ACCURACY_TAG: repr(accuracy), registry.DATA_TAG: data, "eval.data": data}
    registry.set_version_tags(name, version, tags)


def alias_of(name: str, alias: str) -> str | None:
    number = registry.client().get_registered_model(name).aliases.get(alias)
    return None if number is None else str(number)


def run(capsys, *argv: str) -> tuple[int, str]:
    code = promote_job.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_gates_refuse_and_promotion_and_rollback_move_the_alias(model, capsys, monkeypatch):
    name = model
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("LOGNAME", "alice")
    c = registry.client()
    c.set_registered_model_alias(name, "candidate", "1")
    code, out = run(capsys, name, "--min-accuracy", "0.5")
    assert code == 1 and "no eval.accuracy tag: evaluate it first" in out

    evaluated(name, "1", 0.80)
    code, out = run(capsys, name, "--min-accuracy", "0.9")
    assert code == 1 and "accuracy 0.8000, below --min-accuracy 0.9" in out
    assert alias_of(name, "production") is None

    code, out = run(capsys, name, "--min-accuracy", "0.5", "--must-beat", "production")
    assert code == 0 and "nothing -> version 1" in out  # nothing to beat yet
    assert alias_of(name, "production") == "1"
    tags = c.get_model_version(name, "1").tags
    assert tags["production.by"] == "alice" and tags["production.since"].endswith("Z")

    evaluated(name, "2", 0.75)
    c.set_registered_model_alias(name, "candidate", "2")
    code, out = run(capsys, name, "--must-beat", "production")
    assert code == 1 and "does not beat" in out and "0.7500" in out and "0.8000" in out
    evaluated(name, "2", 0.80)
    code, out = run(capsys, name, "--must-beat", "production")
    assert code == 1 and "does not beat" in out  # a tie does not beat
    evaluated(name, "3", 0.95, data="other-data")
    c.set_registered_model_alias(name, "candidate", "3")
    code, out = run(capsys, name, "--must-beat", "production")
    assert code == 1 and "different data" in out
    assert alias_of(name, "production") == "1"

    evaluated(name, "3", 0.95)
    code, out = run(
        capsys, name, "--from", "candidate", "--to", "production", "--must-beat", "production"
    )
    assert code == 0 and "version 1 -> version 3" in out
    model_tags = c.get_registered_model(name).tags
    assert json.loads(model_tags["history.production"]) == ["1"]
    assert model_tags["moved.production.by"] == "alice"
    assert model_tags["moved.production.how"] == "promote from candidate"

    code, out = run(capsys, name, "--to", "production", "--rollback")
    assert code == 0 and "version 3 -> version 1" in out
    assert alias_of(name, "production") == "1"
    assert c.get_registered_model(name).tags["moved.production.how"] == "rollback"
    code, out = run(capsys, name, "--to", "production", "--rollback")
    assert code == 2 and "no earlier version is recorded" in out
    assert alias_of(name, "production") == "1"


def test_missing_model_or_alias_is_an_error_not_a_refusal(model, capsys):
    code, out = run(capsys, model, "--from", "staging")
    assert code == 2 and f"models:/{model}@staging does not exist" in out
    code, out = run(capsys, "no-such-model-here")
    assert code == 2 and "no registered model 'no-such-model-here'" in out
