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

from sav_ray.bench import rows as bench
from sav_ray.bench import serving as bench_serving
from sav_ray.cli import benchmark as benchmark_job
from sav_ray.core import reduce
from sav_ray.fixtures.geometries import GEOMETRIES

ROOT = Path(__file__).resolve().parents[1]

ROW_KEYS = [
    "capture_overhead",
    "forward_passes_per_example",
    "batch_throughput",
    "fit_examples_per_s",
    "actor_forward_share",
    "visual_tokens_limited",
    "mfu",
    "reference_ratio",
    "reducer_speedup",
    "reducer_memory",
    "early_exit",
    "serving_overhead",
    "serving_batching",
    "serving_many_models",
    "serving_peak_rss",
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
        (0.9, "<", 1.0, "pass"),
        (math.nan, "<=", 1.05, "miss"),
    ],
)
def test_row_without_spread_compares_its_value_with_the_target(value, op, threshold, verdict):
    row = bench.Row(key="k", title="title", value=value, op=op, threshold=threshold, note="n")
    assert (row.low, row.high) == (value, value) or math.isnan(value)  # zero spread
    assert row.verdict == verdict
    assert row.to_dict()["target"] == f"{op} {threshold:g}"


@pytest.mark.parametrize(
    ("low", "high", "op", "threshold", "verdict"),
    [
        (0.98, 1.04, "<=", 1.05, "pass"),  # the whole interval meets the target
        (1.02, 1.09, "<=", 1.05, "unclear"),  # it straddles the target
        (1.06, 1.20, "<=", 1.05, "miss"),  # none of it does
        (1.10, 1.40, ">", 1.0, "pass"),
        (0.90, 1.10, ">", 1.0, "unclear"),
        (1.0, 1.0, ">", 1.0, "miss"),
        (0.10, 0.30, "<", 1.0, "pass"),
        (0.98, 1.02, "==", 1.0, "unclear"),
        (1.10, 1.20, "==", 1.0, "miss"),
        (1.0, 1.0, "==", 1.0, "pass"),
        (math.nan, math.nan, "<=", 1.05, "miss"),
        (0.5, 0.6, bench.NO_TARGET, math.nan, "n/a"),
    ],
)
def test_verdict_needs_the_whole_spread_on_one_side_of_the_target(
    low, high, op, threshold, verdict
):
    assert bench.judge(op, threshold, low, high) == verdict
    row = bench.Row("k", "t", (low + high) / 2, op, threshold, low=low, high=high)
    assert row.verdict == verdict
    assert row.to_dict()["verdict"] == verdict
    assert bool(row.to_dict()["why_missed"]) is False  # no if_missed given: nothing to show


def test_headline_is_the_median_of_pair_ratios_not_the_ratio_of_medians():
    # Load comes in bursts: most pairs see the same load on both sides (ratio ~1), two caught
    # a burst on one side only. The ratio of medians (1.0 / 5.0) mixes pairs taken at different
    # moments, like the 0.54 where back-to-back pairs said 0.995.
    a = [1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.5]
    b = [1.0, 1.1, 5.0, 5.0, 5.0, 5.0, 5.0]
    t = bench.Timings(wall={"a": a, "b": b}, cpu={"a": a, "b": b})
    ratios = t.ratios("a", "b", "wall")
    assert ratios == [x / y for x, y in zip(a, b, strict=True)]
    spread = bench.Spread.of(ratios)
    direct = sorted(ratios)
    assert spread.median == direct[3]  # 7 pairs: the 4th smallest
    assert spread.q1 == pytest.approx(np.percentile(direct, 25))
    assert spread.q3 == pytest.approx(np.percentile(direct, 75))
    assert spread.q1 <= spread.median <= spread.q3
    assert spread.median == pytest.approx(1.0)
    assert bench.median(a) / bench.median(b) == pytest.approx(0.2)

    row_args = bench.spread_fields(spread, "cpu")
    assert (row_args["value"], row_args["low"], row_args["high"]) == (
        spread.median,
        spread.q1,
        spread.q3,
    )
    assert "7 back-to-back pair ratios, cpu time" in row_args["spread"]


def test_interquartile_range_of_an_even_count_interpolates():
    spread = bench.Spread.of([4.0, 1.0, 3.0, 2.0])  # sorted 1, 2, 3, 4
    assert (spread.q1, spread.median, spread.q3, spread.n) == (1.75, 2.5, 3.25, 4)
    flipped = spread.scaled(-1.0)
    assert (flipped.q1, flipped.median, flipped.q3) == (-3.25, -2.5, -1.75)


def test_paired_figures_report_wall_and_cpu_time_on_a_cpu():
    t = bench.Timings(
        wall={"x": [2.0, 2.2, 2.0], "y": [1.0, 1.0, 1.0]},
        cpu={"x": [1.0, 1.0, 1.0], "y": [1.0, 1.0, 1.0]},
    )
    spread, measured = bench.paired_figures(t, "x", "y", "cpu", torch.device("cpu"))
    assert spread.median == 1.0  # the verdict's clock
    assert measured["wall_ratio_p50"] == 2.0 and measured["cpu_ratio_p50"] == 1.0
    assert measured["x_wall_ms_p50"] == 2000.0 and measured["reps"] == 3


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


def test_timed_rounds_alternate_the_order_of_each_pair():
    calls = []
    times = bench.timed_rounds(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=0
    )
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [len(t) for t in (*times.wall.values(), *times.cpu.values())] == [3, 3, 3, 3]


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40", None),
        ("cpu", None),
    ],
)
def test_bf16_peak_is_looked_up_by_gpu_name(name, peak):
    assert bench.peak_bf16_tflops(name) == peak


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


def test_load_rounds_alternate_the_configs_and_give_every_figure_a_spread():
    order = []
    send = {"x": lambda: order.append("x"), "y": lambda: order.append("y")}
    results = bench_serving.load_rounds(send, clients=[1, 2], requests={1: 2, 2: 4}, rounds=2)
    assert {k: len(v) for k, v in results.items()} == {
        ("x", 1): 2, ("x", 2): 2, ("y", 1): 2, ("y", 2): 2,
    }  # fmt: skip
    # A load test at n clients sends 1 warm-up + 2n requests: 3 calls at 1 client, 5 at 2.
    assert len(order) == 2 * 2 * (3 + 5)
    starts, sizes = [0, 3, 6, 11, 16, 19, 22, 27], [3, 3, 5, 5] * 2
    tests = [order[i : i + k] for i, k in zip(starts, sizes, strict=True)]
    assert [set(calls) for calls in tests] == [{c} for c in "xyyxyxxy"]  # alternating pairs
    line = bench_serving.summarise(results["x", 2])
    assert line["rounds"] == 2 and line["requests"] == 8 and line["errors"] == 0
    assert line["requests_per_s_q1"] <= line["requests_per_s"] <= line["requests_per_s_q3"]


def test_unknown_model_config_names_the_flag_and_the_known_names(tmp_path, capsys):
    assert (
        benchmark_job.main(["--model-config", "qwen9-vl", "--out", str(tmp_path / "b.json")]) == 2
    )
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: --model-config 'qwen9-vl'"), message
    assert len(message.splitlines()) == 1
    assert all(name in message for name in GEOMETRIES), message
    assert not (tmp_path / "b.json").exists()


def test_model_config_accepts_underscores_for_hyphens():
    assert benchmark_job.model_config_name("qwen2_vl_7b") == "qwen2-vl-7b"
    assert benchmark_job.model_config_name("Qwen/Qwen2-VL-7B-Instruct") == (
        "Qwen/Qwen2-VL-7B-Instruct"
    )


def test_first_quarter_artifact_stops_the_forward_early(tiny_model):
    from sav_ray.core.classify import predict_examples
    from sav_ray.core.images import array_to_image
    from sav_ray.core.prompts import Example

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
    rows = {row["key"]: row for row in report["rows"]}
    assert rows["mfu"]["value"] is None and rows["mfu"]["verdict"] == "n/a"  # no GPU peak on a CPU
    assert rows["fit_examples_per_s"]["target"] == "none"
    for row in report["rows"]:
        if row["key"] == "mfu":
            continue
        assert isinstance(row["value"], float) and math.isfinite(row["value"]), row
        assert row["low"] <= row["value"] <= row["high"], row
        if row["verdict"] != "n/a":
            assert row["target"].split()[0] in ("<=", "<", ">=", "==", ">"), row
        assert row["verdict"] in ("pass", "miss", "unclear", "n/a"), row
        assert row["verdict"] != "miss" or row["why_missed"], row
        assert row["measured"], row
    for key in ("capture_overhead", "batch_throughput", "reference_ratio", "early_exit"):
        assert {"wall_ratio_p50", "cpu_ratio_p50"} <= set(rows[key]["measured"]), key
        assert "cpu time" in rows[key]["spread"], key  # --clock auto on a CPU
        for name, value in row["measured"].items():
            assert isinstance(value, int | float) and math.isfinite(value), (row["key"], name)
    # where a served request's time goes, from the server's counters
    where = rows["serving_overhead"]["measured"]
    assert where["classifier_forward_ms"] > 0 and where["ingress_decode_ms"] > 0
    assert where["ingress_encode_ms"] > 0 and where["classifier_vote_ms"] > 0
    assert rows["serving_many_models"]["measured"]["four_ms_p50"] > 0
    assert rows["forward_passes_per_example"]["value"] == 1.0  # exact, not timed
    assert rows["forward_passes_per_example"]["low"] == rows["forward_passes_per_example"]["high"]
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
    assert set(ROW_KEYS) - {"mfu"} <= set(runs[0].data.metrics)
