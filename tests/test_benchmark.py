"""The benchmark: its helpers on small inputs (fast), and `jobs/benchmark.py --quick` end to end
(slow), checking the report's structure, never the speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sav_ray import bench, bench_serving, reduce

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = [
    "capture_overhead",
    "forward_passes_per_example",
    "batch_throughput",
    "reducer_speedup",
    "reducer_memory",
    "early_exit",
    "serving_overhead",
    "serving_batching",
]


@pytest.mark.parametrize(
    ("value", "op", "threshold", "verdict"),
    [
        (1.05, "<=", 1.05, "pass"),
        (1.06, "<=", 1.05, "miss"),
        (1.0, "==", 1.0, "pass"),
        (1.5, "==", 1.0, "miss"),
        (100.0, ">=", 100.0, "pass"),
        (1.0, ">", 1.0, "miss"),
        (math.nan, "<=", 1.05, "miss"),
    ],
)
def test_row_verdict_compares_value_with_target(value, op, threshold, verdict):
    row = bench.Row("k", "title", value, op, threshold)
    assert row.verdict == verdict
    assert row.to_dict()["target"] == f"{op} {threshold:g}"


def test_reference_loop_counts_the_same_hits_as_the_vectorised_reducer():
    rng = np.random.default_rng(3)
    means = rng.standard_normal((3, 2, 5, 8), dtype=np.float32)  # [class, layer, head, head_dim]
    label_idx = np.arange(60) % 3
    vectors = bench.clustered_vectors(rng, means, label_idx, noise=3.0)
    sums = reduce.ClassSums.from_batch(["a", "b", "c"], vectors, label_idx)
    expected = reduce.head_hits(vectors, label_idx, sums, "paper").hits.ravel()  # [layer*head]

    hits = bench.reference_head_hits(
        torch.from_numpy(vectors.reshape(60, 10, 8)),
        label_idx.tolist(),
        torch.from_numpy(sums.centroids().reshape(3, 10, 8)),
        heads=list(range(10)),
    )
    assert hits == expected.tolist()
    assert 0 < sum(hits) < 600  # neither trivially all right nor all wrong


def test_streaming_reducer_memory_does_not_grow_with_examples():
    small, _ = bench.streaming_peak_bytes(200, (2, 4, 16), chunk=50)
    large, _ = bench.streaming_peak_bytes(800, (2, 4, 16), chunk=50)
    assert large <= 1.2 * small


def test_interleaved_rotates_the_order_of_each_round():
    calls = []
    times = bench.interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=0
    )
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [len(t) for t in times.values()] == [3, 3]


def test_load_test_sends_every_request_once_and_counts_failures():
    sent = []

    def send():
        sent.append(1)
        if len(sent) % 4 == 0:
            raise ConnectionError("dropped")

    result = bench_serving.load_test(send, clients=3, requests=20, warmup=0)
    assert len(sent) == 20
    assert result.errors == 5
    assert result.p50_ms <= result.p95_ms


def test_first_quarter_artifact_stops_the_forward_early(tiny_model):
    from sav_ray.classify import predict_examples
    from sav_ray.images import array_to_image
    from sav_ray.prompts import Example

    lm = tiny_model("qwen2_vl")  # 4 layers: the first quarter is layer 0
    artifact = bench.first_quarter_artifact(lm.info, k=3)
    assert set(artifact.heads[:, 0].tolist()) == {0}
    image = array_to_image(np.full((28, 28, 3), 200, dtype=np.uint8))
    preds = predict_examples(lm, artifact, [Example("What is it?", [image])])
    assert sum(preds[0].votes.values()) == 3


@pytest.mark.slow
def test_quick_benchmark_reports_every_row_with_a_target_and_verdict(tmp_path):
    out = tmp_path / "bench.json"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [
            sys.executable,
            "jobs/benchmark.py",
            "--quick",
            "--out",
            str(out),
            "--tracking-uri",
            store,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    report = json.loads(out.read_text())
    assert [row["key"] for row in report["rows"]] == ROW_KEYS
    for row in report["rows"]:
        assert isinstance(row["value"], float) and math.isfinite(row["value"]), row
        assert row["target"].split()[0] in ("<=", ">=", "==", ">"), row
        assert row["verdict"] in ("pass", "miss"), row
        assert row["verdict"] == "pass" or row["why_missed"], row
        assert row["measured"], row
        for name, value in row["measured"].items():
            assert isinstance(value, int | float) and math.isfinite(value), (row["key"], name)
    assert report["rows"][1]["value"] == 1.0  # one forward pass per example: exact, not timed
    assert {(s["config"], s["clients"]) for s in report["serving"]} == {
        (config, clients) for config in ("batched", "max_batch_size=1") for clients in (1, 8, 16)
    }
    assert all(s["errors"] == 0 for s in report["serving"])

    table = out.with_suffix(".md").read_text()
    for row in report["rows"]:
        assert f"| {row['title']} |" in table and f"| {row['verdict']} |" in table

    import mlflow

    runs = mlflow.MlflowClient(store).search_runs(
        [mlflow.MlflowClient(store).get_experiment_by_name("sav-ray-benchmark").experiment_id]
    )
    assert len(runs) == 1
    assert set(ROW_KEYS) <= set(runs[0].data.metrics)
