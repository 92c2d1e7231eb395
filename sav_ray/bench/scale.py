"""Benchmark rows for many classes: the fit's Ray reducer on generated vectors at 7B geometry.

The same number of examples (20,000 float16 vectors of 28 x 28 heads x 128, Qwen2-VL-7B's
geometry: 4 GB) as 1000 classes x 20 shots and as 100 classes x 200 shots, in shuffled
order, through the real reducer path on a local Ray: `first_pass` (class sums), `head_hits`
(head scores), head selection and the selected centroids. Each case runs in a fresh Python
process (its own Ray), so the peak resident memory of its driver is its own; the vectors are
generated in Ray tasks block by block, never on the driver.

    python -m sav_ray.bench.scale            # full size (9 minutes on a busy 2-core machine)
    python -m sav_ray.bench.scale --quick    # 2,000 examples: 100 x 20 against 10 x 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sav_ray.bench.rows import REFERENCE_HEAD_DIM, REFERENCE_HEADS, REFERENCE_LAYERS, Row

SHAPE = (REFERENCE_LAYERS, REFERENCE_HEADS, REFERENCE_HEAD_DIM)  # [layer, head, head_dim]


@dataclass(frozen=True)
class ScaleCase:
    classes: int
    shots: int
    shape: tuple[int, int, int] = SHAPE
    block_rows: int = 200  # rows per block, as a Parquet file of saved vectors gives
    num_heads: int = 20
    seed: int = 0

    @property
    def examples(self) -> int:
        return self.classes * self.shots

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(f"class{c:04d}" for c in range(self.classes))


def _block_labels(case: ScaleCase, start: int, stop: int) -> np.ndarray:
    """Label indices [stop - start] of examples start..stop of the shuffled `case`."""
    order = np.random.default_rng(case.seed).permutation(case.examples)  # [examples]
    return order[start:stop] % case.classes


def _generate_block(batch: dict[str, np.ndarray], case: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray task: one block of float16 vectors around per-class means, from the block's index."""
    c = ScaleCase(**{**case, "shape": tuple(case["shape"])})
    block = int(batch["id"][0])
    start = block * c.block_rows
    y = _block_labels(c, start, min(c.examples, start + c.block_rows))  # [rows]
    rng = np.random.default_rng((c.seed, 1, block))
    vectors = rng.standard_normal((len(y), *c.shape), dtype=np.float32)  # [rows, l, h, d]
    for label in np.unique(y):
        mean = np.random.default_rng((c.seed, 2, int(label))).standard_normal(
            c.shape, dtype=np.float32
        )  # [layer, head, head_dim]
        vectors[y == label] += mean
    labels = np.array(c.labels, dtype=object)
    return {"vectors": vectors.astype(np.float16), "label": labels[y]}


class PeakRss:
    """The highest resident set size of this process, sampled every `interval` seconds, and
    the highest private part of it (RSS less shared pages: object-store mappings excluded)."""

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self.peak_private = 0
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        mem = self._process.memory_info()
        self.peak = max(self.peak, mem.rss)
        self.peak_private = max(self.peak_private, mem.rss - mem.shared)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def run_case(case: ScaleCase) -> dict[str, float]:
    """On the running Ray: generate the case's vectors, then time the reducer path on them."""
    import ray

    from sav_ray.core import reduce
    from sav_ray.pipelines.fitting import first_pass, head_hits

    blocks = -(-case.examples // case.block_rows)
    started = time.perf_counter()
    ds = (
        ray.data.range(blocks, override_num_blocks=blocks)
        .map_batches(_generate_block, batch_size=1, fn_kwargs={"case": asdict(case)})
        .materialize()
    )
    generate_seconds = time.perf_counter() - started
    with PeakRss() as rss:
        baseline = rss.peak
        started = time.perf_counter()
        sums = first_pass(ds, case.labels).sums
        first_seconds = time.perf_counter() - started
        scores = head_hits(ds, sums, "paper").scores()  # [layer, head]
        heads = reduce.select_heads(scores, case.num_heads)  # [k, 2]
        centroids = sums.centroids(heads)  # [class, k, head_dim]
        seconds = time.perf_counter() - started
    if int(sums.counts.sum()) != case.examples or (sums.counts != case.shots).any():
        raise RuntimeError(f"generated {sums.counts.sum()} examples, expected {case.examples}")
    assert centroids.shape == (case.classes, len(heads), case.shape[2]), centroids.shape
    return {
        "seconds": seconds,
        "first_pass_seconds": first_seconds,
        "generate_seconds": generate_seconds,
        "peak_rss_mib": rss.peak / 2**20,
        "peak_private_mib": rss.peak_private / 2**20,
        "baseline_rss_mib": baseline / 2**20,
        # float64 [class, layer, head, head_dim], held by the sums actor, not this driver
        "class_sums_mib": len(sums.labels) * int(np.prod(sums.shape)) * 8 / 2**20,
        "blocks": blocks,
    }


def run_case_in_subprocess(case: ScaleCase, num_cpus: int = 2) -> dict[str, float]:
    """`run_case` in a fresh Python process, so each case's peak memory is its own."""
    cmd = [sys.executable, "-m", "sav_ray.bench.scale", "--case", json.dumps(asdict(case))]
    cmd += ["--num-cpus", str(num_cpus)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"bench_scale case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def many_classes_rows(
    examples: int = 20_000,
    many: int = 1000,
    few: int = 100,
    shape: tuple[int, int, int] = SHAPE,
    block_rows: int = 200,
    num_cpus: int = 2,
) -> list[Row]:
    """Two rows: peak driver memory and wall time of `many` classes against `few` classes,
    both with `examples` examples. Quick: `many_classes_rows(2000, 100, 10)`."""
    if examples % many or examples % few:
        raise ValueError(f"examples ({examples}) must divide by both class counts ({many}, {few})")
    k = min(20, shape[0] * shape[1])
    cases = {n: ScaleCase(n, examples // n, shape, block_rows, num_heads=k) for n in (many, few)}
    got = {n: run_case_in_subprocess(case, num_cpus) for n, case in cases.items()}
    big, small = got[many], got[few]
    geometry = " x ".join(map(str, shape))
    setup = (
        f"{examples} generated float16 vectors [{geometry}] in shuffled order, blocks of "
        f"{block_rows} rows, local Ray with {num_cpus} CPUs, one fresh process per case: "
        "first_pass (class sums) + head_hits (paper) + top-k selection and centroids"
    )
    measured = {
        f"{key}_{n}": value for n in (many, few) for key, value in got[n].items() if key != "blocks"
    }
    return [
        Row(
            key="many_classes_memory",
            title=(
                f"Peak driver memory, {many} classes x {examples // many} shots / "
                f"{few} x {examples // few} ({geometry})"
            ),
            value=big["peak_rss_mib"] / small["peak_rss_mib"],
            op="<=",
            threshold=1.5,
            measured={
                **measured,
                "private_ratio": big["peak_private_mib"] / small["peak_private_mib"],
            },
            note=(
                f"{setup}; resident set size of the driver sampled every 10 ms (private: less "
                "shared pages, i.e. without the object-store pages it maps). Partials are sized "
                "by the classes in each block and go by reference to a Ray actor that holds the "
                f"float64 total of every class's sums ({big['class_sums_mib']:.0f} MiB at "
                f"{many} classes) and puts the unit centroids in the object store: the driver "
                "only sees counts, head hits and the selected heads' centroids"
            ),
            if_missed=(
                "something the driver fetches or builds grows with the classes: the counts, "
                "the per-block head hits and the selected centroids [class, k, head_dim] do, "
                "but by kilobytes to a few MiB"
            ),
        ),
        Row(
            key="many_classes_time",
            title=f"Reducer wall time, {many} classes / {few} (same {examples} examples)",
            value=big["seconds"] / small["seconds"],
            op="<=",
            threshold=many / few,
            measured=measured,
            note=(
                f"{setup}. Head scoring compares every example with every class centroid, so "
                "its work grows with the classes: the target is no worse than linear"
            ),
            if_missed="time grows faster than the classes: a per-class cost beyond the products",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sav_ray.bench.scale", description=__doc__)
    p.add_argument("--quick", action="store_true", help="2,000 examples: 100 x 20 against 10 x 200")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, JSON in and out
    args = p.parse_args(argv)
    if args.case:
        import ray

        spec = json.loads(args.case)
        case = ScaleCase(**{**spec, "shape": tuple(spec["shape"])})
        vector_bytes = case.examples * int(np.prod(case.shape)) * 2  # float16
        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=vector_bytes + 2 * 10**9,  # the vectors, centroids, partials
        )
        try:
            print(json.dumps(run_case(case)))
        finally:
            ray.shutdown()
        return 0
    sizes = (2000, 100, 10) if args.quick else (20_000, 1000, 100)
    for row in many_classes_rows(*sizes, num_cpus=args.num_cpus):
        print(json.dumps(row.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
