"""Evaluation metrics, label matching, the all-heads baseline, and jobs/evaluate.py end to end."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest

from sav_ray.cli import evaluate as evaluate_job
from sav_ray.core import reduce
from sav_ray.core.capture import capture_examples
from sav_ray.core.classify import predict_examples
from sav_ray.pipelines.config import ModelConfig
from sav_ray.pipelines.evaluation import (
    NO_LABEL,
    all_heads_centroids,
    all_heads_votes,
    compute_metrics,
    expected_calibration_error,
    match_label,
)
from sav_ray.tracking import registry
from sav_ray.tracking import runs as tracking

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_on_a_hand_counted_example():
    m = compute_metrics(
        ["a", "b", "c"], np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, NO_LABEL, 0])
    )
    assert m.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]  # no-label answer left out
    assert m.accuracy == 0.5
    assert m.recall == {"a": 0.5, "b": 1.0, "c": 0.0}
    # F1: a = 0.5 (p 1/2, r 1/2), b = 0.8 (p 2/3, r 1), c = 0
    assert m.macro_f1 == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m.ece is None and m.rows == 6


def test_expected_calibration_error():
    confidence = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, False, True, True])
    # bin (0.9, 1]: accuracy 0.5 vs 0.95; bin (0.5, 0.6]: accuracy 1 vs 0.55; each half the rows
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.45)
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([True, False])) == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(np.array([1.5]), np.array([True]))


def test_zero_shot_answers_match_a_label_as_a_whole_word():
    assert match_label("I see a CAT and a dog", ["dog", "cat"]) == 1  # earliest mention
    assert match_label("concatenate", ["cat"]) == NO_LABEL  # not a word of its own
    assert match_label("a red car.", ["red", "red car"]) == 1  # longer label at the same place
    assert match_label("red_circle!", ["red_circle", "blue"]) == 0
    assert match_label("", ["a"]) == NO_LABEL


def test_all_heads_vote_is_every_head_voting():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 3, 4, 8))  # [n, layer, head, head_dim]
    centroids = rng.normal(size=(2, 3, 4, 8))  # [class, layer, head, head_dim]
    votes = all_heads_votes(vectors, centroids)
    every_head = np.array([[layer, head] for layer in range(3) for head in range(4)])
    expected = reduce.classify(
        reduce.gather_heads(vectors, every_head), reduce.gather_heads(centroids, every_head)
    )
    np.testing.assert_array_equal(votes.label_idx, expected.label_idx)
    assert votes.votes.sum(axis=1).tolist() == [12] * 5
    own = all_heads_votes(centroids[[1, 0]], centroids)  # each centroid is nearest to itself
    assert own.label_idx.tolist() == [1, 0]


@pytest.fixture(scope="module")
def evaluated(demo_sav, small_data):
    """demo_sav registered; the command line of jobs/evaluate.py for it."""
    _, out, artifact = demo_sav
    name, experiment = f"eval-{uuid.uuid4().hex[:8]}", f"exp-{uuid.uuid4().hex[:8]}"
    uri = tracking.use_store()
    with tracking.run(experiment, uri, "register"):
        mv = registry.register_artifact(name, artifact, out)
    argv = [
        "--artifact", f"models:/{name}@candidate", "--data", str(small_data["test"]),
        "--train", str(small_data["train"]), "--max-new-tokens", "4",
        "--experiment", experiment, "--batch-size", "4",
    ]  # fmt: skip
    return name, mv, experiment, argv


@pytest.mark.slow
def test_evaluate_job_logs_three_methods_and_tags_the_version(
    local_ray, evaluated, demo_sav, small_data, manifest_examples, capsys
):
    name, mv, experiment, argv = evaluated
    lm, _, artifact = demo_sav
    assert evaluate_job.main(argv) == 0
    printed = capsys.readouterr().out
    for method in ("SAV (k=10 heads)", "all heads (48) vote", "zero-shot"):
        assert method in printed

    test_examples, test_labels = manifest_examples(small_data["test"])
    y = np.array([artifact.labels.index(label) for label in test_labels])  # [n]
    sav = [p.label for p in predict_examples(lm, artifact, test_examples)]
    sav_accuracy = float(np.mean([p == t for p, t in zip(sav, test_labels, strict=True)]))
    train_examples, train_labels = manifest_examples(small_data["train"])
    train_y = np.array([artifact.labels.index(label) for label in train_labels])
    train_vectors = capture_examples(lm, train_examples, artifact.prompt)  # [n, L, H, D]
    centroids = reduce.ClassSums.from_batch(artifact.labels, train_vectors, train_y).centroids()
    test_vectors = capture_examples(lm, test_examples, artifact.prompt)  # [n, L, H, D]
    all_accuracy = float((all_heads_votes(test_vectors, centroids).label_idx == y).mean())

    tags = registry.client().get_model_version(name, mv.version).tags
    assert float(tags["eval.accuracy"]) == pytest.approx(sav_accuracy)
    assert float(tags["eval.all_heads.accuracy"]) == pytest.approx(all_accuracy)
    assert 0.0 <= float(tags["eval.zero_shot.accuracy"]) <= 1.0
    assert tags["eval.rows"] == str(len(test_labels))
    assert tags["eval.data"] == str(Path(small_data["test"]).resolve())

    c = registry.client()
    (run,) = c.search_runs(
        [c.get_experiment_by_name(experiment).experiment_id], "tags.`sav.job` = 'evaluate'"
    )
    assert run.info.status == "FINISHED" and tags["eval.run_id"] == run.info.run_id
    metrics = run.data.metrics
    assert metrics["sav/accuracy"] == pytest.approx(sav_accuracy)
    assert metrics["all_heads/accuracy"] == pytest.approx(all_accuracy)
    assert {"sav/macro_f1", "sav/ece", "zero_shot/accuracy", "all_heads/ece"} <= set(metrics)
    assert {f"sav/recall/{label}" for label in artifact.labels} <= set(metrics)
    files = {f.path for f in c.list_artifacts(run.info.run_id)}
    assert {"confusion_sav.png", "evaluation.json", "predictions.jsonl"} <= files
    rows_file = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="predictions.jsonl"
    )
    rows = [json.loads(line) for line in Path(rows_file).read_text().splitlines()]
    assert [artifact.labels[r["sav"]] for r in rows] == sav
    assert all(isinstance(r["zero_shot_answer"], str) for r in rows)
    linked = mlflow.get_logged_model(registry.logged_model_id(mv)).metrics
    assert "sav/accuracy" in {m.key for m in linked}


def test_evaluate_refuses_rows_with_labels_the_sav_does_not_know(
    evaluated, small_data, tmp_path, capsys
):
    _, _, _, argv = evaluated
    rows = [json.loads(line) for line in Path(small_data["test"]).read_text().splitlines()]
    folder = Path(small_data["test"]).parent
    for r in rows:
        r["image"] = str(folder / r["image"])
    rows[2]["label"] = "purple_hexagon"
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = list(argv)
    argv[argv.index("--data") + 1] = str(data)
    assert evaluate_job.main(argv) == 2
    err = capsys.readouterr().err
    assert "--data: row 3 has label 'purple_hexagon'" in err


@pytest.mark.slow
def test_all_heads_centroids_from_saved_vectors_need_no_model(
    local_ray, demo_sav, small_data, manifest_examples, tmp_path
):
    from sav_ray.pipelines.fitting import write_vectors

    lm, _, artifact = demo_sav
    examples, labels = manifest_examples(small_data["train"])
    vectors = capture_examples(lm, examples, artifact.prompt)  # [n, layer, head, head_dim]
    items = [
        {"row": i + 1, "id": str(i + 1), "label": label, "vectors": v}
        for i, (label, v) in enumerate(zip(labels, vectors, strict=True))
    ]
    meta = {
        "labels": artifact.labels,
        "base_model": artifact.base_model.to_dict(),
        "prompt": artifact.prompt.to_dict(),
        "vectors_dtype": "float32",
    }
    write_vectors(local_ray.data.from_items(items), str(tmp_path / "vectors"), meta)
    got = all_heads_centroids(artifact, ModelConfig(), vectors_dir=str(tmp_path / "vectors"))
    y = np.array([artifact.labels.index(label) for label in labels])
    expected = reduce.ClassSums.from_batch(artifact.labels, vectors, y).centroids()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)  # [class, layer, head, head_dim]


@pytest.mark.slow
def test_evaluate_runs_on_a_registered_version_with_no_other_flag(local_ray, evaluated, capsys):
    """No training data: the all-heads baseline is skipped with a note (the fit saved no
    vectors); the probabilities' ECE is reported beside the vote shares' (which is lower is
    checked on the full demo data in test_fit_job.py: these 9 rows are all right, so both
    ECEs are within a few hundredths of 0); ROC-AUC and PR-AUC of a positive label; metrics
    logged, the version tagged."""
    name, mv, experiment, argv = evaluated
    data = argv[argv.index("--data") + 1]
    argv = ["--artifact", f"models:/{name}@candidate", "--data", data, "--experiment", experiment,
            "--baselines", "all", "--positive-label", "red_circle", "--target-precision", "0.9",
            "--max-new-tokens", "2"]  # fmt: skip
    assert evaluate_job.main(argv) == 0
    printed = capsys.readouterr().out
    assert "note: the all-heads baseline is skipped: its fit saved no vectors" in printed
    assert "ECE(p)" in printed and "zero-shot" in printed and "ROC-AUC" in printed
    tags = registry.client().get_model_version(name, mv.version).tags
    assert 0 <= float(tags["eval.ece_probabilities"]) <= 1 and 0 <= float(tags["eval.ece"]) <= 1
    assert 0.5 <= float(tags["eval.roc_auc"]) <= 1.0 and "eval.pr_auc" in tags
    c = registry.client()
    runs = c.search_runs(
        [c.get_experiment_by_name(experiment).experiment_id],
        f"tags.`sav.job` = 'evaluate' and attributes.run_id = '{tags['eval.run_id']}'",
    )
    [run] = runs
    assert {"sav/ece_probabilities", "sav/roc_auc", "sav/pr_auc"} <= set(run.data.metrics)
    assert "all_heads/accuracy" not in run.data.metrics
    files = {f.path for f in c.list_artifacts(run.info.run_id)}
    assert "reliability.png" in files
