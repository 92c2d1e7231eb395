"""jobs/fit.py and jobs/predict.py end to end on a local Ray, on the demo model and data."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sav_ray.cli import fit as fit_job
from sav_ray.cli import predict as predict_job
from sav_ray.core.artifact import load_artifact
from sav_ray.core.manifest import read_manifest
from sav_ray.pipelines.config import FitConfig, ModelConfig
from sav_ray.pipelines.fitting import fit
from sav_ray.pipelines.predicting import accuracy, predict_table

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_cfg(demo_model_dir, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    return FitConfig(
        model=str(demo_model_dir),
        train=str(demo_data["train"]),
        output=str(out / "sav"),
        batch_size=8,
    )


@pytest.fixture(scope="module")
def one_actor(local_ray, base_cfg, tmp_path_factory):
    vectors = tmp_path_factory.mktemp("vec") / "v"
    cfg = replace(base_cfg, save_vectors=str(vectors))
    artifact, stats = fit(cfg)
    return artifact, stats, vectors


def test_one_forward_pass_per_training_example(one_actor):
    artifact, stats, _ = one_actor
    assert stats.examples == 60
    assert stats.forward_rows == 60  # rows counted by a hook on the first decoder layer
    # the actors' timings come back beside the vectors: the forward is part of each call
    assert 0 < stats.forward_seconds <= stats.busy_seconds
    assert stats.forward_share == stats.forward_seconds / stats.busy_seconds


def test_auto_placement_on_a_cpu_cluster_is_one_cpu_actor(one_actor):
    _, stats, _ = one_actor  # the defaults: --actors auto --gpus-per-actor auto
    [placement] = stats.placements
    assert placement["gpu_ids"] == [] and placement["device"] == "cpu"


def test_two_actors_give_the_same_heads_and_centroids(one_actor, base_cfg):
    artifact, _, _ = one_actor
    two, stats = fit(replace(base_cfg, actors=2, cpus_per_actor=0.5))
    np.testing.assert_array_equal(two.heads, artifact.heads)
    np.testing.assert_allclose(two.centroids, artifact.centroids, atol=1e-5, rtol=0)
    assert stats.forward_rows == 60


def test_sav_reaches_the_accuracy_target_on_held_out_data(one_actor, base_cfg, demo_data):
    artifact, stats, _ = one_actor
    assert len(artifact.heads) <= 20
    table = read_manifest(demo_data["test"], require_label=False)
    records = predict_table(table, ModelConfig(model=base_cfg.model), artifact)
    assert len(records) == 30
    assert accuracy(records) >= 0.9
    for r in records:
        assert sum(r["votes"].values()) == len(artifact.heads)
        assert abs(sum(r["scores"].values()) - 1.0) < 1e-9


def test_from_vectors_reproduces_the_artifact(one_actor, base_cfg):
    artifact, _, vectors = one_actor
    meta = json.loads((vectors / "sav_vectors.json").read_text())
    assert meta["base_model"] == artifact.base_model.to_dict()
    refit, stats = fit(replace(base_cfg, model="", train="", from_vectors=str(vectors)))
    assert stats.forward_rows == 0  # no model ran
    np.testing.assert_array_equal(refit.heads, artifact.heads)
    np.testing.assert_allclose(refit.centroids, artifact.centroids, atol=1e-6, rtol=0)
    assert refit.labels == artifact.labels
    assert refit.base_model == artifact.base_model
    k5, _ = fit(replace(base_cfg, model="", train="", from_vectors=str(vectors), num_heads=5))
    np.testing.assert_array_equal(k5.heads, artifact.heads[:5])


def test_float16_vectors_keep_the_selection(one_actor, base_cfg, tmp_path):
    artifact, _, _ = one_actor
    half, _ = fit(replace(base_cfg, vectors_dtype="float16", save_vectors=str(tmp_path / "v16")))
    files = list((tmp_path / "v16").glob("*.parquet"))
    import pyarrow.parquet as pq

    assert "halffloat" in str(pq.read_schema(files[0]).field("vectors").type.storage_type)
    np.testing.assert_allclose(half.centroids, artifact.centroids, atol=2e-2, rtol=0)


def test_cli_writes_a_loadable_artifact_and_predicts(
    local_ray, base_cfg, demo_data, tmp_path, capsys
):
    out = tmp_path / "sav"
    code = fit_job.main(
        [
            "--model",
            base_cfg.model,
            "--train",
            base_cfg.train,
            "--output",
            str(out),
            "--num-heads",
            "10",
        ]
    )
    assert code == 0
    loaded = load_artifact(out)
    assert len(loaded.heads) == 10 and loaded.selection.k == 10
    preds = tmp_path / "preds.jsonl"
    code = predict_job.main(
        ["--artifact", str(out), "--data", str(demo_data["test"]), "--output", str(preds)]
    )
    assert code == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 30 and {"label", "votes", "scores", "true_label"} <= set(rows[0])
    assert "accuracy" in capsys.readouterr().out


# --- bad input: a clear message naming the row or field, a non-zero exit, no artifact --------


def write_manifest(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def good_rows(demo_data) -> list[dict]:
    base = demo_data["train"].parent
    rows = [json.loads(line) for line in demo_data["train"].read_text().splitlines()]
    for r in rows:
        r["image"] = str(base / r["image"])
    return rows


def run_fit(tmp_path, manifest, *extra, capsys):
    out = tmp_path / "sav"
    code = fit_job.main(
        ["--model", "unused-model", "--train", str(manifest), "--output", str(out), *extra]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert not out.exists()
    assert not any(p.name.startswith(".sav") for p in tmp_path.iterdir())  # no temp dir left
    return err


def test_missing_image_file_names_row_and_file(demo_data, tmp_path, capsys):
    rows = good_rows(demo_data)
    rows[6]["image"] = str(tmp_path / "nope.png")
    err = run_fit(tmp_path, write_manifest(tmp_path, rows), capsys=capsys)
    assert "row 7" in err and "nope.png" in err


def test_row_without_label_names_row_and_field(demo_data, tmp_path, capsys):
    rows = good_rows(demo_data)
    rows[3]["label"] = None
    err = run_fit(tmp_path, write_manifest(tmp_path, rows), capsys=capsys)
    assert "row 4" in err and "label" in err


def test_single_class_is_refused(demo_data, tmp_path, capsys):
    rows = [r for r in good_rows(demo_data) if r["label"] == "red_circle"]
    err = run_fit(tmp_path, write_manifest(tmp_path, rows), capsys=capsys)
    assert "red_circle" in err and "label" in err


def test_loo_with_a_one_example_class_is_refused(demo_data, tmp_path, capsys):
    rows = good_rows(demo_data)
    reds = [i for i, r in enumerate(rows) if r["label"] == "red_circle"]
    rows = [r for i, r in enumerate(rows) if i not in reds[1:]]
    err = run_fit(tmp_path, write_manifest(tmp_path, rows), "--selection", "loo", capsys=capsys)
    assert "red_circle" in err and "loo" in err


def test_unreadable_image_in_the_middle_names_the_row(
    local_ray, base_cfg, demo_data, tmp_path, capsys
):
    rows = good_rows(demo_data)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    rows[30]["image"] = str(broken)
    out = tmp_path / "sav"
    code = fit_job.main(
        [
            "--model",
            base_cfg.model,
            "--train",
            str(write_manifest(tmp_path, rows)),
            "--output",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    ours = [line for line in err.splitlines() if line.startswith("error: ")]  # Ray logs too
    assert len(ours) == 1 and ours[0].startswith("error: row 31") and "broken.png" in ours[0]
    assert not out.exists()


def test_plain_python_run_exits_non_zero_on_a_bad_flag(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "fit.py"),
            "--model",
            "m",
            "--train",
            "x.jsonl",
            "--output",
            str(tmp_path / "o"),
            "--num-heads",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--num-heads" in proc.stderr


def _unit(v):
    n = np.linalg.norm(v)
    return v / n if n > 0 else v * 0


def test_auto_k_probabilities_and_a_threshold_from_saved_vectors(
    one_actor, base_cfg, demo_data, manifest_examples
):
    """--num-heads auto over the grid, the temperature, a threshold reaching its target
    precision leave-one-out (checked by recomputing each centroid without the example), and
    predictions whose probabilities equal the softmax of mean cosines over the temperature."""
    from sav_ray.core import calibration
    from sav_ray.core.capture import capture_examples
    from sav_ray.core.models import load_model

    _, _, vectors = one_actor
    cfg = replace(
        base_cfg,
        model="",
        train="",
        from_vectors=str(vectors),
        num_heads="auto",
        positive_label="red_circle",
        target_precision=0.9,
    )
    artifact, stats = fit(cfg)
    curve = stats.k_curve
    total = artifact.base_model.num_layers * artifact.base_model.num_heads
    assert list(curve.ks) == calibration.k_grid(total)
    assert len(artifact.heads) == curve.ks[curve.choose()]
    t = artifact.threshold
    assert t.positive_label == "red_circle" and t.precision >= 0.9

    lm = load_model(base_cfg.model)
    examples, labels = manifest_examples(base_cfg.train)
    train = capture_examples(lm, examples, artifact.prompt)  # [n, L, H, D]
    heads = artifact.heads
    x = train[:, heads[:, 0], heads[:, 1]]  # [n, k, D]
    y = np.array([artifact.labels.index(label) for label in labels])
    loo = []
    for i in range(len(y)):
        others = np.arange(len(y)) != i
        s = [
            np.mean(
                [
                    _unit(x[i, h]) @ _unit(x[others & (y == c), h].mean(axis=0))
                    for h in range(len(heads))
                ]
            )
            for c in range(len(artifact.labels))
        ]
        z = np.array(s) / artifact.calibration.temperature
        e = np.exp(z - z.max())
        loo.append(e[artifact.labels.index("red_circle")] / e.sum())
    called = np.array(loo) >= t.threshold
    positive = y == artifact.labels.index("red_circle")
    assert (called & positive).sum() / called.sum() >= 0.9

    from sav_ray.core.artifact import write_artifact

    written = write_artifact(artifact, Path(base_cfg.output).parent / "auto")
    table = read_manifest(demo_data["test"], require_label=False)
    records = predict_table(table, ModelConfig(model=base_cfg.model), written)
    test_examples, _ = manifest_examples(demo_data["test"])
    test = capture_examples(lm, test_examples, artifact.prompt)[:, heads[:, 0], heads[:, 1]]
    for r, v in zip(records, test, strict=True):
        p = r["probabilities"]
        assert abs(sum(p.values()) - 1.0) <= 1e-6
        s = [
            np.mean([_unit(v[h]) @ _unit(written.centroids[c, h]) for h in range(len(heads))])
            for c in range(len(written.labels))
        ]
        z = np.array(s) / written.calibration.temperature
        e = np.exp(z - z.max())
        np.testing.assert_allclose([p[lab] for lab in written.labels], e / e.sum(), atol=1e-6)
        assert r["decision"] == (p["red_circle"] >= t.threshold)
    # on the demo data the probabilities are better calibrated than the vote shares
    vote_ok = np.array([r["label"] == r["true_label"] for r in records])
    top_p = [max(r["probabilities"], key=r["probabilities"].get) for r in records]
    p_ok = np.array([label == r["true_label"] for label, r in zip(top_p, records, strict=True)])
    ece_votes = calibration.expected_calibration_error(
        np.array([max(r["scores"].values()) for r in records]), vote_ok
    )
    ece_p = calibration.expected_calibration_error(
        np.array([max(r["probabilities"].values()) for r in records]), p_ok
    )
    assert ece_p < ece_votes, (ece_p, ece_votes)
