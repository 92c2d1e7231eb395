"""Several artifacts on one base model, one pass of the model: the Ray Data actor in process
(rows counted by a hook) and jobs/predict.py with two --artifact flags on a local Ray."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from sav_ray.cli import predict as predict_job
from sav_ray.core.artifact import write_artifact
from sav_ray.core.manifest import ManifestFields, read_manifest
from sav_ray.core.prompts import PromptConfig
from sav_ray.pipelines.config import ModelConfig
from sav_ray.pipelines.predicting import ClassifyRows
from sav_ray.pipelines.preprocess import object_column, preprocess_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

ASKED = PromptConfig(text_template="Answer in one word. {text}")


@pytest.fixture(scope="module")
def savs(demo_sav, small_data, manifest_examples, fit_in_process, tmp_path_factory):
    """name -> written artifact: `shapes` (k=10), `circles` (circle / other, k=4, same prompt)
    and `asked` (k=6, another prompt)."""
    lm, _, shapes = demo_sav
    examples, labels = manifest_examples(small_data["train"])
    circle = ["circle" if label == "red_circle" else "other" for label in labels]
    tmp = tmp_path_factory.mktemp("many")
    return {
        "shapes": shapes,
        "circles": write_artifact(
            fit_in_process(lm, examples, circle, PromptConfig(), 4), tmp / "circles"
        ),
        "asked": write_artifact(fit_in_process(lm, examples, labels, ASKED, 6), tmp / "asked"),
    }


def preprocessed(small_data, demo_model_dir, artifacts):
    """The test manifest as the predict job's CPU tasks hand it to the actor."""
    from sav_ray.core.classify import input_variants

    table = read_manifest(
        small_data["test"], ManifestFields.from_flags("image", "question", "label", None)
    )
    columns = {k: object_column(v) for k, v in table.to_pydict().items()}
    (prompt, prep), *more = input_variants(artifacts)[0]
    more = [(p.to_dict(), q.to_dict()) for p, q in more]
    return preprocess_rows(
        columns, str(demo_model_dir), None, prompt.to_dict(), prep.to_dict(), more
    )


def alone(model, artifact, batch):
    return [json.loads(p) for p in ClassifyRows(model, artifact)(batch)["prediction"]]


@pytest.mark.parametrize(
    ("names", "rows_per_input"), [(["shapes", "circles"], 1), (["shapes", "asked", "circles"], 2)]
)
def test_artifacts_are_predicted_in_one_pass_equal_to_separate_runs(
    savs, small_data, demo_model_dir, names, rows_per_input
):
    """Artifacts sharing a prompt share each row's forward row; another prompt adds one row per
    input; every artifact's predictions equal a run with it alone."""
    model = ModelConfig(model=str(demo_model_dir))
    artifacts = [savs[n] for n in names]
    batch = preprocessed(small_data, demo_model_dir, artifacts)
    n = len(batch["row"])
    actor = ClassifyRows(model, artifacts)
    out = actor(batch)
    assert int(out["forward_rows"].sum()) == rows_per_input * n == actor.counter.rows
    assert actor.counter.counts[0] == 1  # one forward call for the whole batch
    together = [json.loads(p) for p in out["prediction"]]  # [row][artifact]
    for a, artifact in enumerate(artifacts):
        single = alone(model, artifact, batch if a == 0 else _only(batch, artifacts, a))
        assert [row[a]["label"] for row in together] == [p["label"] for p in single]
        assert [row[a]["votes"] for row in together] == [p["votes"] for p in single]


def _only(batch, artifacts, a):
    """The batch with artifact `a`'s encoded column as the one a single-artifact actor reads."""
    from sav_ray.core.classify import input_variants
    from sav_ray.pipelines.preprocess import INPUTS, inputs_column

    variant = input_variants(artifacts)[1][a]
    return {**batch, INPUTS: batch[inputs_column(variant)]}


def test_the_predict_job_runs_two_artifacts_in_one_pass(
    local_ray, savs, demo_sav, small_data, demo_model_dir, tmp_path, capsys
):
    _, shapes_dir, _ = demo_sav
    circles_dir = tmp_path / "circles"
    write_artifact(savs["circles"], circles_dir)
    out = tmp_path / "preds.jsonl"
    code = predict_job.main(
        [
            "--artifact",
            str(shapes_dir),
            "--artifact",
            f"circ={circles_dir}",
            "--data",
            str(small_data["test"]),
            "--output",
            str(out),
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    printed = capsys.readouterr().out
    assert f"in one pass of the model ({len(rows)} forward rows)" in printed
    assert "accuracy" in printed and " circ" in printed
    model = ModelConfig(model=str(demo_model_dir))
    batch = preprocessed(small_data, demo_model_dir, [savs["shapes"]])
    # unnamed, a fit's folder .../NAME/sav is named NAME
    for name, artifact in ((shapes_dir.parent.name, savs["shapes"]), ("circ", savs["circles"])):
        expected = alone(model, artifact, batch)
        assert [r[name]["label"] for r in rows] == [p["label"] for p in expected]
        assert [r[name]["votes"] for r in rows] == [p["votes"] for p in expected]


def test_artifacts_of_other_base_models_or_one_name_are_refused(
    savs, demo_sav, small_data, tmp_path, capsys
):
    _, shapes_dir, shapes = demo_sav
    alien = tmp_path / "alien"
    write_artifact(replace(shapes, base_model=replace(shapes.base_model, revision="abc123")), alien)
    args = ["--data", str(small_data["test"]), "--output", str(tmp_path / "p.jsonl")]
    code = predict_job.main(["--artifact", str(shapes_dir), "--artifact", str(alien), *args])
    err = capsys.readouterr().err
    assert code == 2 and f"--artifact {alien}: fitted on" in err and "abc123" in err
    code = predict_job.main(["--artifact", f"a={shapes_dir}", "--artifact", f"a={alien}", *args])
    assert code == 2 and "both named 'a'" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()
