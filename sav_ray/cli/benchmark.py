"""Benchmark sav-ray against the SAVs reference method and against its own bare forward pass.

Builds a mid-size random Qwen2-VL locally (8 layers, hidden 1024, 16 heads), or with
`--model-config NAME --layers N` a random model at a real checkpoint's geometry
(`sav_ray.fixtures.geometries`), generates its images, and measures, in the same run:
  1. capture overhead: a batched forward with hooks on every layer / without hooks
  2. forward passes per training example in a real fit on Ray (the reference makes 3)
  3. examples/s at the chosen batch size / at batch size 1
  4. a whole fit's examples/s, and the model FLOPs utilisation (on a GPU with a known peak)
  5. sav-ray's fit work per example / the SAVs reference's (batch 1, three passes)
  6. head scoring, vectorised / the reference's per-head loop; streaming reducer memory
  7. early-exit latency (heads in the first quarter of the layers) / a full forward
  8. Ray Serve (serve/app.py): p50/p95 and req/s at 1, 8, 16 clients, batched and not, and
     the HTTP + voting overhead over the bare forward pass
A timed row's headline is the median of back-to-back pair ratios, with their interquartile
range as its spread; its verdict is pass or miss only when the whole spread is on one side of
the target, "unclear" otherwise (see `sav_ray/bench/rows.py`). Writes the JSON report to --out and a
Markdown table beside it (same name, .md), prints both, and logs them to an MLflow run in the
experiment `sav-ray-benchmark`.

    python jobs/benchmark.py --out data/benchmark/benchmark.json     # ~10 min on 2 CPUs
    python jobs/benchmark.py --quick --out /tmp/bench.json           # a few minutes, every row
    python jobs/benchmark.py --device cuda --dtype bfloat16 --model-config qwen2-vl-7b --layers 28

The in-process rows are timed on wall time and on this process's CPU time; by default
(`--clock auto`) their verdicts use CPU time on a CPU, which other processes' load does not
inflate, and wall time on a GPU. A fit on Ray and serving are wall time only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sav_ray.bench import preprocess as bench_preprocess
from sav_ray.bench import rows as bench
from sav_ray.bench import serving as bench_serving
from sav_ray.cli import job_parser, parse_job_args
from sav_ray.core.artifact import write_artifact
from sav_ray.core.errors import ConfigError, job_main
from sav_ray.core.models import default_device, load_model
from sav_ray.core.prompts import PromptConfig
from sav_ray.fixtures import geometries
from sav_ray.fixtures.demo_data import make_dataset
from sav_ray.fixtures.tiny import build_tiny_model
from sav_ray.pipelines.config import FitConfig
from sav_ray.pipelines.fitting import fit, init_ray
from sav_ray.tracking import runs as tracking

EXPERIMENT = "sav-ray-benchmark"


@dataclass(frozen=True)
class Sizes:
    """How big and how often: the full benchmark, or --quick (smaller model, a few repetitions:
    it checks that every row runs; its spreads are too rough for verdicts to be trusted)."""

    layers: int = 8
    hidden: int = 1024
    heads: int = 16
    fit_per_class: int = 32  # 3 classes
    reps: int = 20  # capture overhead, early exit
    throughput_examples: int = 16
    throughput_reps: int = 10
    reference_examples: int = 8
    reference_reps: int = 10
    loop_heads: int = 56  # of 784, for the reference loop
    reducer_reps: int = 10
    memory_shape: tuple[int, int, int] = (28, 28, 128)
    clients: tuple[int, ...] = (1, 8, 16)
    requests: dict[int, int] = field(default_factory=lambda: {1: 6, 8: 24, 16: 48})  # a round
    rounds: int = 10
    overhead_reps: int = 20
    memory_requests: tuple[int, int] = (8, 4000)  # parallel requests, image side (16-bit PNGs)


FULL = Sizes()
QUICK = Sizes(
    hidden=512,
    heads=8,
    fit_per_class=8,
    reps=3,
    throughput_examples=8,
    throughput_reps=2,
    reference_examples=2,
    reference_reps=2,
    loop_heads=8,
    reducer_reps=2,
    memory_shape=(8, 16, 64),
    requests={1: 4, 8: 8, 16: 16},
    rounds=2,
    overhead_reps=5,
    memory_requests=(4, 2000),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = job_parser("benchmark", __doc__)
    p.add_argument("--quick", action="store_true", help="smaller model, fewer repetitions")
    p.add_argument(
        "--model-config",
        default=None,
        metavar="NAME",
        help="benchmark a random model at a real checkpoint's geometry: "
        + ", ".join(geometries.GEOMETRIES),
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="decoder layers of the benchmark model (default: 8, or 1 with --model-config)",
    )
    p.add_argument(
        "--out",
        default="data/benchmark/benchmark.json",
        help="JSON report path; the Markdown table is written beside it (.md)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda")
    p.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16"
    )
    p.add_argument("--batch-size", type=int, default=8, help="the fit's batch size (default 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--clock",
        choices=["auto", *bench.CLOCKS],
        default="auto",
        help="the clock of the in-process rows' verdicts (both are reported): auto (CPU time "
        "on a CPU, wall time on a GPU), wall, or cpu (this process's CPU time; CPU devices only)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite in data/mlflow/)",
    )
    args = parse_job_args(p, argv)
    if args.batch_size < 2:
        p.error(f"--batch-size {args.batch_size}: must be at least 2 (row 3 compares it with 1)")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: must be at least 1")
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers {args.layers}: must be at least 1")
    return args


def build_model(args: argparse.Namespace, sizes: Sizes, out_dir: Path) -> Path:
    """The benchmark model: at `--model-config`'s geometry, else the mid-size random Qwen2-VL."""
    if args.model_config is None:
        layers = args.layers or sizes.layers
        return build_tiny_model(
            "qwen2_vl", out_dir, num_layers=layers, hidden_size=sizes.hidden,
            num_heads=sizes.heads,
        )  # fmt: skip
    return geometries.build_geometry_model(
        model_config_name(args.model_config), out_dir, layers=args.layers or 1
    )


def model_config_name(name: str) -> str:
    """`--model-config`'s geometry key; `qwen2_vl_7b` spells `qwen2-vl-7b` too."""
    for candidate in (name, name.replace("_", "-")):
        try:
            geometries.geometry(candidate)
            return candidate
        except ConfigError:
            pass
    raise ConfigError(
        f"--model-config {name!r} is not known; choose one of {', '.join(geometries.GEOMETRIES)}"
    )


def fit_config(
    model_dir: Path, train: Path, output: Path, batch_size: int, dtype: str, device: str
) -> FitConfig:
    gpus = 1.0 if device.startswith("cuda") else 0.0
    return FitConfig(
        model=str(model_dir),
        train=str(train),
        output=str(output),
        dtype=dtype,
        batch_size=batch_size,
        gpus_per_actor=gpus,
    ).validate()


def run_benchmark(
    args: argparse.Namespace, sizes: Sizes, work: Path
) -> tuple[list[bench.Row], list[dict[str, Any]], dict[str, Any]]:
    """(rows, serving load table, run description)."""
    device = default_device() if args.device == "auto" else args.device
    if args.clock == "cpu" and device.startswith("cuda"):
        raise ConfigError("--clock cpu does not see GPU work; use --clock wall on a GPU")
    threads = torch.get_num_threads()
    load_before = os.getloadavg()

    model_dir = build_model(args, sizes, work / "model")
    data = make_dataset(work / "data", classes=3, train_per_class=sizes.fit_per_class)
    lm = load_model(str(model_dir), dtype=args.dtype, device=device)
    if lm.input_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.input_device)
    clock = bench.verdict_clock(args.clock, lm.input_device)
    examples = bench.load_examples(data["train"])
    prompt = PromptConfig()

    rows = [bench.capture_overhead(lm, examples[: args.batch_size], prompt, sizes.reps, clock)]

    init_ray()
    fits = {
        b: fit(fit_config(model_dir, data["train"], work / "sav", b, args.dtype, device))
        for b in (args.batch_size, 1)
    }
    artifact, _ = fits[args.batch_size]
    write_artifact(artifact, work / "sav")  # served in row 6
    rows.append(
        bench.forward_passes_row(
            {b: (s.examples, s.forward_rows) for b, (_, s) in fits.items()}, args.batch_size
        )
    )
    fit_rates = {b: s.examples_per_second for b, (_, s) in fits.items()}
    throughput_examples = examples[: sizes.throughput_examples]
    row, timings = bench.batch_throughput(
        lm, throughput_examples, prompt, args.batch_size, sizes.throughput_reps, clock
    )
    rows.append(row)
    rows.append(bench.fit_throughput(fit_rates, args.batch_size))
    rows.append(bench_preprocess.forward_share_row(fits[args.batch_size][1]))
    rows.append(bench_preprocess.visual_tokens())
    rows.append(
        bench.utilisation(
            lm, throughput_examples, prompt, timings.wall["batched"], fit_rates[args.batch_size]
        )
    )
    rows.append(
        bench.reference_ratio(
            lm, examples[: sizes.reference_examples], prompt, args.batch_size,
            sizes.reference_reps, 1 / fit_rates[args.batch_size], clock,
        )
    )  # fmt: skip
    rows.append(
        bench.reducer_speedup(loop_heads=sizes.loop_heads, reps=sizes.reducer_reps, clock=clock)
    )
    rows.append(bench.reducer_memory(shape=sizes.memory_shape))
    rows.append(bench.early_exit(lm, examples[0], prompt, sizes.reps, clock))

    serving_rows, serving_table = bench_serving.serving(
        work / "sav", lm, examples[0], dtype=args.dtype, device=device, threads=threads,
        clients=sizes.clients, requests=sizes.requests, rounds=sizes.rounds,
        overhead_reps=sizes.overhead_reps, memory_requests=sizes.memory_requests,
    )  # fmt: skip
    rows += serving_rows

    import ray

    ray.shutdown()
    return (
        rows,
        serving_table,
        {
            "command": shlex.join(["python", "jobs/benchmark.py", *sys.argv[1:]]),
            "quick": args.quick,
            "environment": {
                "device": device,
                "device_name": bench.device_name(lm.input_device),
                "dtype": lm.info.dtype,
                "torch_threads": threads,
                "verdict_clock": clock,
                "cpus": os.cpu_count(),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "python": platform.python_version(),
                "torch": torch.__version__,
                "platform": platform.platform(),
            },
            "model": {
                "config": args.model_config or "qwen2_vl (mid-size random)",
                "architecture": lm.info.architecture,
                "layers": lm.info.num_layers,
                "heads": lm.info.num_heads,
                "head_dim": lm.info.head_dim,
                "hidden": lm.model.config.get_text_config().hidden_size,
                "parameters": sum(p.numel() for p in lm.model.parameters()),
            },
        },
    )


def log_to_mlflow(report: dict[str, Any], markdown: str, tracking_uri: str | None) -> str:
    """One run in EXPERIMENT: each row's value and figures as metrics, both reports as files."""
    import mlflow

    uri = tracking.use_store(tracking_uri)
    name = "benchmark-quick" if report["quick"] else "benchmark"
    with tracking.run(EXPERIMENT, uri, name, tags={"sav.job": "benchmark"}) as active:
        mlflow.log_params({**report["environment"], **report["model"], "quick": report["quick"]})
        metrics = {}
        for row in report["rows"]:
            if row["value"] is not None:
                metrics[row["key"]] = row["value"]
            if row["low"] != row["high"]:
                metrics[tracking.metric_key(row["key"], "low")] = row["low"]
                metrics[tracking.metric_key(row["key"], "high")] = row["high"]
            metrics.update(
                {tracking.metric_key(row["key"], k): v for k, v in row["measured"].items()}
            )
        for s in report["serving"]:
            for k in ("p50_ms", "p95_ms", "requests_per_s"):
                metrics[tracking.metric_key("serving", s["config"], f"c{s['clients']}", k)] = s[k]
        mlflow.log_metrics(metrics)
        mlflow.set_tags({f"verdict.{row['key']}": row["verdict"] for row in report["rows"]})
        mlflow.log_dict(report, "benchmark.json")
        mlflow.log_text(markdown, "benchmark.md")
        return active.info.run_id


@job_main
def main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="sav-bench-") as work:
        rows, serving, run = run_benchmark(args, sizes, Path(work))
    report = {**run, "rows": [row.to_dict() for row in rows], "serving": serving}
    header = {
        "command": report["command"],
        **report["environment"],
        "model": f"{report['model']['layers']} layers x {report['model']['heads']} heads "
        f"x head_dim {report['model']['head_dim']}",
    }
    markdown = bench.markdown(rows, serving, header)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(json.dumps(report, indent=2))
    print(markdown)
    run_id = log_to_mlflow(report, markdown, args.tracking_uri)
    print(f"JSON {out}, Markdown {out.with_suffix('.md')}, MLflow run {run_id} ({EXPERIMENT})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
