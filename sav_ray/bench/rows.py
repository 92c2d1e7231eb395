"""Measurements for `jobs/benchmark.py`: each function returns one `Row` of the benchmark table.

Every timed figure compares two things measured in the same process and run, so it carries
over between machines better than the absolute times (which are kept in `measured` too).
A paired measurement runs both sides back to back, in alternating order, `reps` times; its
headline is the MEDIAN OF THE PAIR RATIOS (a burst of load from other processes hits both
halves of a pair alike, where a ratio of two medians mixes different moments) and its spread
is the interquartile range of those ratios. A row's verdict is "pass" only when its whole
spread meets the target, "miss" when none of it does, "unclear" otherwise; counts, memory
peaks and other deterministic figures have zero spread.

Every in-process timing is taken on two clocks: wall time (latency as a user sees it) and this
process's CPU time, which other processes' load does not inflate. The verdict uses the clock a
row names in its `spread`; CPU time only on a CPU device (GPU work is not in it), where it
is also reported. Work spread over processes (a Ray fit, Serve) is wall time only.

    row = capture_overhead(lm, examples[:8], PromptConfig(), reps=20, clock="cpu")
    row.value, row.low, row.high, row.verdict     # 1.01, 0.99, 1.03, "pass"
"""

from __future__ import annotations

import json
import math
import operator
import re
import statistics
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sav_ray.core import reduce
from sav_ray.core.artifact import BaseModelInfo, SavArtifact, Selection
from sav_ray.core.capture import capture_examples, capture_inputs
from sav_ray.core.classify import needed_layers, predict_examples
from sav_ray.core.images import load_image
from sav_ray.core.models import LoadedModel, decoder_layers
from sav_ray.core.prompts import Example, PromptConfig, encode

_COMPARE = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
    "==": operator.eq,
}
NO_TARGET = ""  # a Row's `op` for a figure reported without a target (verdict "n/a")
CLOCKS = ("wall", "cpu")

# The SAVs reference code's fixed geometry (Qwen2-VL-7B, LLaVA-OneVision-7B): 28 x 28 heads.
REFERENCE_LAYERS, REFERENCE_HEADS, REFERENCE_HEAD_DIM = 28, 28, 128
REFERENCE_FORWARDS_PER_EXAMPLE = 3  # class means, head scores, top-head means: one pass each

# Dense bfloat16 peak TFLOP/s (no sparsity) by GPU name; anything else reports no utilisation.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
# The H100's PCIe and NVL cards peak lower than the SXM figure above.
_NOT_SXM = re.compile(r"\b(PCIe|NVL)\b", re.IGNORECASE)


# Statistics ------------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


@dataclass(frozen=True)
class Spread:
    """Median and quartiles of repeated figures (numpy's linear interpolation)."""

    median: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, xs: Sequence[float]) -> Spread:
        q1, q2, q3 = np.percentile(np.asarray(xs, dtype=np.float64), [25, 50, 75])
        return cls(median=float(q2), q1=float(q1), q3=float(q3), n=len(xs))

    def scaled(self, factor: float) -> Spread:
        """The spread of every figure times `factor` (a negative factor swaps the quartiles)."""
        q1, q3 = sorted((self.q1 * factor, self.q3 * factor))
        return Spread(self.median * factor, q1, q3, self.n)


def judge(op: str, threshold: float, low: float, high: float) -> str:
    """ "pass" when every value in [low, high] meets `op threshold`, "miss" when none does,
    "unclear" when the interval straddles the target; "n/a" for a row without a target."""
    if op == NO_TARGET:
        return "n/a"
    if not (math.isfinite(low) and math.isfinite(high)):
        return "miss"
    if op == "==":
        if low == high == threshold:
            return "pass"
        return "miss" if threshold < low or threshold > high else "unclear"
    meets_low, meets_high = _COMPARE[op](low, threshold), _COMPARE[op](high, threshold)
    if meets_low and meets_high:
        return "pass"
    return "unclear" if meets_low or meets_high else "miss"


@dataclass
class Row:
    """One line of the table: a headline figure, its spread, its target, the figures behind it."""

    key: str  # stable id, also the MLflow metric name
    title: str
    value: float
    op: str  # how `value` must compare with `threshold`: "<=", "<", ">=", ">", "==" or NO_TARGET
    threshold: float
    measured: dict[str, float] = field(default_factory=dict)
    note: str = ""  # how it was measured
    if_missed: str = ""  # why the target is missed, from the measured figures; shown on a miss
    low: float | None = None  # the spread [low, high]; None: zero spread (value)
    high: float | None = None
    spread: str = ""  # what [low, high] is and which clock the verdict uses

    def __post_init__(self) -> None:
        assert self.op in _COMPARE or self.op == NO_TARGET, self.op
        self.low = self.value if self.low is None else self.low
        self.high = self.value if self.high is None else self.high

    @property
    def target(self) -> str:
        return "none" if self.op == NO_TARGET else f"{self.op} {self.threshold:g}"

    @property
    def verdict(self) -> str:
        return judge(self.op, self.threshold, self.low, self.high)

    def to_dict(self) -> dict[str, Any]:
        verdict = self.verdict
        return {
            "key": self.key,
            "title": self.title,
            "value": _finite_or_none(self.value),
            "low": _finite_or_none(self.low),
            "high": _finite_or_none(self.high),
            "spread": self.spread or "none: not a repeated timing",
            "target": self.target,
            "verdict": verdict,
            "measured": dict(self.measured),
            "note": self.note,
            "why_missed": self.if_missed if verdict == "miss" else "",
        }


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None  # JSON has no NaN


def spread_fields(s: Spread, clock: str, what: str = "back-to-back pair ratios") -> dict[str, Any]:
    """Row arguments for a repeated figure: the median as headline, the IQR as spread."""
    return {
        "value": s.median,
        "low": s.q1,
        "high": s.q3,
        "spread": f"interquartile range of {s.n} {what}, {clock} time",
    }


# Timing ----------------------------------------------------------------------------------------


def synchronize(device: torch.device | None) -> None:
    """Wait for queued GPU work, so wall time covers it (no-op on the CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Seconds of each function in every round, on both clocks: {name: [seconds, ...]}."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    def on(self, clock: str) -> dict[str, list[float]]:
        return self.wall if clock == "wall" else self.cpu

    def ratios(self, num: str, den: str, clock: str) -> list[float]:
        """num / den within each round: the pair ratios."""
        t = self.on(clock)
        return [a / b for a, b in zip(t[num], t[den], strict=True)]


def timed_rounds(
    fns: dict[str, Callable[[], object]],
    reps: int,
    warmup: int = 1,
    device: torch.device | None = None,
) -> Timings:
    """Time each function `reps` times; every round runs each once, back to back, starting from
    a different one each round (with two: a-b, b-a, a-b, ...). GPU work is waited for before
    and after each call, so wall time covers it."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            w, c = time.perf_counter(), time.process_time()
            fns[name]()
            synchronize(device)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return Timings(wall, cpu)


def paired_figures(
    t: Timings, num: str, den: str, clock: str, device: torch.device, scale: float = 1.0
) -> tuple[Spread, dict[str, float]]:
    """The spread of the pair ratios `scale * num / den` on `clock`, and the figures for a
    row's `measured`: each side's median ms and the ratios' quartiles on wall time and, on a CPU
    device, on CPU time too (on a GPU the process's CPU time does not contain the work)."""
    measured: dict[str, float] = {}
    for c in ("wall", "cpu") if device.type == "cpu" else ("wall",):
        s = Spread.of(t.ratios(num, den, c)).scaled(scale)
        measured |= {
            f"{num}_{c}_ms_p50": 1e3 * median(t.on(c)[num]),
            f"{den}_{c}_ms_p50": 1e3 * median(t.on(c)[den]),
            f"{c}_ratio_p50": s.median,
            f"{c}_ratio_q1": s.q1,
            f"{c}_ratio_q3": s.q3,
        }
    measured["reps"] = len(t.wall[num])
    return Spread.of(t.ratios(num, den, clock)).scaled(scale), measured


def verdict_clock(clock: str, device: torch.device) -> str:
    """The clock a timed row's verdict uses: "auto" is CPU time on a CPU, wall time on a GPU."""
    if clock == "auto":
        return "cpu" if device.type == "cpu" else "wall"
    return clock


def load_examples(manifest: str | Path) -> list[Example]:
    """The examples of a generated manifest (`sav_ray.fixtures.demo_data` rows: image, question)."""
    manifest = Path(manifest)
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return [
        Example(
            text=r["question"], images=[load_image(manifest.parent / r["image"])], where=f"row {i}"
        )
        for i, r in enumerate(rows)
    ]


def _on_device(lm: LoadedModel, examples: list[Example], prompt: PromptConfig) -> dict[str, Any]:
    """The tokenised batch on the model's input device."""
    return {
        k: v.to(lm.input_device) if hasattr(v, "to") else v
        for k, v in dict(encode(lm.processor, examples, prompt)).items()
    }


# 1. Capture overhead -------------------------------------------------------------------------


def capture_overhead(
    lm: LoadedModel, examples: list[Example], prompt: PromptConfig, reps: int, clock: str = "wall"
) -> Row:
    """One batched forward with hooks on every layer's o_proj against the same forward bare."""
    inputs = _on_device(lm, examples, prompt)
    device = lm.input_device

    def bare() -> None:
        with torch.inference_mode():
            lm.model(**inputs, use_cache=False, logits_to_keep=1)

    def hooked() -> None:
        capture_inputs(lm, inputs)

    t = timed_rounds({"hooked": hooked, "bare": bare}, reps, device=device)
    s, measured = paired_figures(t, "hooked", "bare", clock, device)
    seq = int(inputs["input_ids"].shape[1])
    extra_ms = 1e3 * (median(t.on(clock)["hooked"]) - median(t.on(clock)["bare"]))
    return Row(
        key="capture_overhead",
        title="Capture overhead: batched forward with hooks on all layers / without",
        **spread_fields(s, clock),
        op="<=",
        threshold=1.05,
        measured={"batch_size": len(examples), "seq_len": seq, **measured},
        note=(
            "same tokenised batch, the two sides back to back in alternating order; the hooked "
            "side also copies the [batch, layer, head, head_dim] vectors to the CPU"
        ),
        if_missed=(
            f"the hooks (a last-token gather per layer) and the copy to the CPU add "
            f"{extra_ms:.1f} ms to a forward of only {seq} tokens; a real prompt's hundreds of "
            "image tokens make the forward longer and the fixed cost relatively smaller"
        ),
    )


# 2 and 3. Forward passes per example, fit throughput ------------------------------------------


def forward_passes_row(fits: dict[int, tuple[int, float]], batch_size: int) -> Row:
    """From real fits' FitStats, {batch size: (examples, forward rows)}: rows the model ran per
    training example at `batch_size` (the headline) and at the other batch sizes."""
    examples, forward_rows = fits[batch_size]
    measured: dict[str, float] = {
        "examples": examples,
        "forward_rows": forward_rows,
        "batch_size": batch_size,
    }
    for size, (n, rows) in sorted(fits.items()):
        measured[f"per_example_batch{size}"] = rows / n
    measured["reference_forwards_per_example"] = REFERENCE_FORWARDS_PER_EXAMPLE
    return Row(
        key="forward_passes_per_example",
        title="Forward passes per training example in a fit (reference: 3)",
        value=forward_rows / examples,
        op="==",
        threshold=1.0,
        measured=measured,
        note=(
            "sav_ray.pipelines.fitting.fit on a local Ray; the model actor counts the rows its first "
            "decoder layer ran; class sums, head scores and the top-k centroids all reuse the "
            "one set of vectors"
        ),
        if_missed=(
            "the model actors ran some rows more than once (e.g. a Ray task retried after a "
            "failure): see the job's log"
        ),
    )


def _capture_in_batches(
    lm: LoadedModel, examples: list[Example], prompt: PromptConfig, size: int, passes: int = 1
) -> Callable[[], None]:
    """The fit actor's work on `examples` (tokenise, forward, capture), `size` at a time, each
    batch `passes` times (the SAVs reference runs each example three times at batch size 1)."""

    def go() -> None:
        for start in range(0, len(examples), size):
            for _ in range(passes):
                capture_examples(lm, examples[start : start + size], prompt)

    return go


def batch_throughput(
    lm: LoadedModel,
    examples: list[Example],
    prompt: PromptConfig,
    batch_size: int,
    reps: int,
    clock: str = "wall",
) -> tuple[Row, Timings]:
    """Examples per second of the fit actor's work (encode, forward, capture) at `batch_size`
    against batch size 1, on the same examples. Also returns the timings (for `utilisation`)."""
    device = lm.input_device
    t = timed_rounds(
        {
            "batched": _capture_in_batches(lm, examples, prompt, batch_size),
            "single": _capture_in_batches(lm, examples, prompt, 1),
        },
        reps,
        device=device,
    )
    s, measured = paired_figures(t, "single", "batched", clock, device)  # = rate ratio
    rates = {
        f"examples_per_s_batch{batch_size}": len(examples) / median(t.wall["batched"]),
        "examples_per_s_batch1": len(examples) / median(t.wall["single"]),
    }
    row = Row(
        key="batch_throughput",
        title=f"Fit throughput: batch size {batch_size} / batch size 1 (examples/s)",
        **spread_fields(s, clock),
        op=">",
        threshold=1.0,
        measured={"batch_size": batch_size, "examples": len(examples), **rates, **measured},
        note=(
            "capture path of the fit actor (tokenise, forward, hooks) on the same model and "
            "examples; each pair's ratio is time at batch 1 / time batched. The issue sets no "
            "number: batching must pay"
        ),
        if_missed=(
            f"a batch of {batch_size} costs as much per example as single inputs here: one "
            "input's matrix products already keep the CPU cores busy. Batching pays where the "
            "device has parallel capacity left over (a GPU)"
        ),
    )
    return row, t


def fit_throughput(fit_rates: dict[int, float], batch_size: int) -> Row:
    """Whole fits on Ray (manifest to vectors), {batch size: examples/s}: reported, no target."""
    return Row(
        key="fit_examples_per_s",
        title=f"Fit: examples/s of a whole fit on Ray at batch size {batch_size}",
        value=fit_rates[batch_size],
        op=NO_TARGET,
        threshold=math.nan,
        measured={f"batch{size}": rate for size, rate in sorted(fit_rates.items())},
        note=(
            "sav_ray.pipelines.fitting.fit, manifest read to materialised vectors, once per batch size (no "
            "spread: one fit each); includes starting the model actor and loading the model (the "
            "first fit also Ray Data's cold start), so a small training set understates it"
        ),
    )


def decoder_parameters(lm: LoadedModel, layers: int | None = None) -> int:
    """Parameters of the first `layers` decoder layers (all by default): the weights each
    prompt token passes through (embeddings, vision tower and LM head left out)."""
    decoder = decoder_layers(lm.model)
    return sum(p.numel() for layer in list(decoder)[:layers] for p in layer.parameters())


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bfloat16 peak of a GPU named like `torch.cuda.get_device_name()`, if known."""
    for key, peak in BF16_PEAK_TFLOPS.items():
        if re.search(rf"\b{key}\b", device_name):
            return None if key == "H100" and _NOT_SXM.search(device_name) else peak
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def utilisation(
    lm: LoadedModel,
    examples: list[Example],
    prompt: PromptConfig,
    batched_seconds: Sequence[float],
    fit_rate: float,
) -> Row:
    """Model FLOPs utilisation of the batched capture path: FLOPs per example
    (2 x decoder parameters x prompt tokens) x examples/s over the GPU's bfloat16 peak.
    `batched_seconds`: wall seconds of each repetition over all `examples`."""
    device = lm.input_device
    mask = encode(lm.processor, examples, prompt)["attention_mask"]  # [batch, seq]
    tokens = float(mask.sum(dim=1).double().mean())
    params = decoder_parameters(lm)
    flops = 2.0 * params * tokens  # per example
    # Time quartiles turn into throughput quartiles the other way round (q3 time -> q1 rate).
    rate = Spread.of([len(examples) / s for s in batched_seconds])
    name = device_name(device)
    peak = peak_bf16_tflops(name)
    measured: dict[str, float] = {
        "decoder_parameters": params,
        "prompt_tokens_mean": tokens,
        "gflops_per_example": flops / 1e9,
        "achieved_tflops_p50": flops * rate.median / 1e12,
    }
    if peak is not None:
        measured |= {"peak_tflops": peak, "whole_fit_mfu": flops * fit_rate / (peak * 1e12)}
    if device.type == "cuda":
        measured["gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    headline = (
        spread_fields(rate.scaled(flops / (peak * 1e12)), "wall", "repetitions")
        if peak
        else {"value": math.nan}
    )
    return Row(
        key="mfu",
        title="Model FLOPs utilisation of the batched capture path (bfloat16 dense peak)",
        **headline,
        op=NO_TARGET,
        threshold=math.nan,
        measured=measured,
        note=(
            f"device {name}; FLOPs per example = 2 x parameters of the decoder layers that ran x "
            "prompt tokens (vision tower and attention scores left out), at the rate of row "
            "batch_throughput's batched side; "
            + (
                f"peak {peak:g} TFLOP/s"
                if peak
                else "not available: no bfloat16 peak known for this device"
            )
        ),
    )


def reference_ratio(
    lm: LoadedModel,
    examples: list[Example],
    prompt: PromptConfig,
    batch_size: int,
    reps: int,
    fit_seconds_per_example: float,
    clock: str = "wall",
) -> Row:
    """sav-ray's fit work per example (one batched forward with capture) against the SAVs
    reference's (three forwards with capture per example, batch size 1), same examples."""
    device = lm.input_device
    t = timed_rounds(
        {
            "sav_ray": _capture_in_batches(lm, examples, prompt, batch_size),
            "reference": _capture_in_batches(
                lm, examples, prompt, 1, passes=REFERENCE_FORWARDS_PER_EXAMPLE
            ),
        },
        reps,
        device=device,
    )
    s, measured = paired_figures(t, "sav_ray", "reference", clock, device)
    reference_s = median(t.wall["reference"]) / len(examples)
    return Row(
        key="reference_ratio",
        title=(
            f"Fit time per example: sav-ray (batch {batch_size}, 1 pass) / the SAVs reference "
            "(batch 1, 3 passes)"
        ),
        **spread_fields(s, clock),
        op="<",
        threshold=1.0,
        measured={
            "examples": len(examples),
            "reference_ms_per_example": 1e3 * reference_s,
            "whole_fit_ms_per_example": 1e3 * fit_seconds_per_example,
            "whole_fit_ratio": fit_seconds_per_example / reference_s,
            **measured,
        },
        note=(
            "the model work of a fit in one process, both sides back to back; whole_fit_ratio "
            "puts a whole fit on Ray (actor start-up and model load included) over the "
            "reference's time per example"
        ),
        if_missed=(
            "one batched pass costs more here than three single ones: batching does not pay on "
            "this device (see batch_throughput)"
        ),
    )


# 4. Reducer ------------------------------------------------------------------------------------


def clustered_vectors(
    rng: np.random.Generator, means: np.ndarray, label_idx: np.ndarray, noise: float = 2.0
) -> np.ndarray:
    """Vectors [n, layer, head, head_dim] float32 around their class means [class, ...]."""
    x = rng.standard_normal((len(label_idx), *means.shape[1:]), dtype=np.float32)
    x *= noise
    x += means[label_idx]
    return x


def reference_head_hits(
    vectors: torch.Tensor, label_idx: Sequence[int], class_means: torch.Tensor, heads: Sequence[int]
) -> list[int]:
    """Head scoring as the SAVs reference does it (`record_head_performance`): per example and
    per head, one cosine similarity against the class means and one `.item()`.
    vectors [n, layer*head, head_dim], class_means [class, layer*head, head_dim]."""
    success = [0] * len(heads)
    for x, label in zip(vectors, label_idx, strict=True):
        for j, i in enumerate(heads):
            scores = torch.nn.functional.cosine_similarity(class_means[:, i, :], x[i, :], dim=-1)
            if scores.argmax(dim=0).item() == label:
                success[j] += 1
    return success


def reducer_speedup(
    n: int = 1000,
    shape: tuple[int, int, int] = (REFERENCE_LAYERS, REFERENCE_HEADS, REFERENCE_HEAD_DIM),
    classes: int = 3,
    loop_heads: int = 28,
    reps: int = 10,
    seed: int = 0,
    clock: str = "wall",
) -> Row:
    """`reduce.head_hits` over every head against the reference's loop timed on `loop_heads`
    heads and extrapolated linearly to all of them (the loop's cost is the same per head)."""
    rng = np.random.default_rng(seed)
    num_layers, num_heads, head_dim = shape
    all_heads = num_layers * num_heads
    means = rng.standard_normal((classes, *shape), dtype=np.float32)
    label_idx = np.arange(n) % classes
    vectors = clustered_vectors(rng, means, label_idx, noise=4.0)  # [n, layer, head, head_dim]
    labels = [f"class{c}" for c in range(classes)]
    sums = reduce.ClassSums.from_batch(labels, vectors, label_idx)

    heads = np.linspace(0, all_heads - 1, loop_heads).round().astype(int).tolist()
    flat = torch.from_numpy(vectors.reshape(n, all_heads, head_dim))  # no copy
    class_means = torch.from_numpy(sums.centroids().reshape(classes, all_heads, head_dim))
    hits: dict[str, Any] = {}  # each side's last result, to check that they agree

    def loop() -> None:
        hits["loop"] = reference_head_hits(flat, label_idx.tolist(), class_means, heads)

    def vectorised() -> None:
        hits["vectorised"] = reduce.head_hits(vectors, label_idx, sums, "paper")

    t = timed_rounds({"loop": loop, "vectorised": vectorised}, reps, warmup=0)
    cpu = torch.device("cpu")
    s, measured = paired_figures(t, "loop", "vectorised", clock, cpu, scale=all_heads / len(heads))
    agree = np.mean(np.array(hits["loop"]) == hits["vectorised"].hits.ravel()[heads])
    vectorised_s = median(t.on(clock)["vectorised"])
    loop_s = median(t.on(clock)["loop"]) * all_heads / len(heads)
    return Row(
        key="reducer_speedup",
        title=(
            f"Reducer: head scoring, {n} examples x {all_heads} heads x {head_dim} dims, "
            "vectorised / per-head loop"
        ),
        **spread_fields(s, clock),
        op=">=",
        threshold=100.0,
        measured={
            "loop_heads_timed": len(heads),
            "heads": all_heads,
            "examples": n,
            "head_hits_agree": float(agree),
            **measured,
        },
        note=(
            f"the loop (torch cosine_similarity + .item() per example and head, as the SAVs "
            f"reference) ran on {len(heads)} of {all_heads} heads, its time (loop_*_ms) scaled by "
            f"{all_heads}/{len(heads)} in the ratios; head_hits_agree: share of those heads whose "
            "hit count equals the vectorised one"
        ),
        if_missed=(
            f"the reference's loop costs {1e6 * loop_s / (n * all_heads):.0f} us per example and "
            f"head here; the vectorised scorer ({vectorised_s:.2f} s) is memory-bound: it "
            "copies every vector once into float32 groups of heads for one small matrix "
            "product per group"
        ),
    )


def streaming_peak_bytes(
    n: int, shape: tuple[int, int, int], classes: int = 3, chunk: int = 100, seed: int = 0
) -> tuple[int, float]:
    """Peak traced bytes and seconds of the two streaming passes (ClassSums, then HeadHits)
    over `n` generated examples read `chunk` at a time, as the fit reads blocks."""
    means = np.random.default_rng(seed).standard_normal((classes, *shape), dtype=np.float32)
    labels = [f"class{c}" for c in range(classes)]

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(seed + 1)  # each pass reads the same examples
        for begin in range(0, n, chunk):
            y = np.arange(begin, min(n, begin + chunk)) % classes
            yield clustered_vectors(rng, means, y), y

    tracemalloc.start()
    started = time.perf_counter()
    try:
        sums = reduce.ClassSums.zeros(labels, shape)
        for x, y in chunks():
            sums = sums.merge(reduce.ClassSums.from_batch(labels, x, y))
        hits = reduce.HeadHits.zeros(shape[:2])
        for x, y in chunks():
            hits = hits.merge(reduce.head_hits(x, y, sums, "paper"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert hits.n == n, (hits.n, n)
    return peak, time.perf_counter() - started


def reducer_memory(
    small: int = 2000, large: int = 8000, shape: tuple[int, int, int] = (28, 28, 128)
) -> Row:
    peak_small, seconds_small = streaming_peak_bytes(small, shape)
    peak_large, seconds_large = streaming_peak_bytes(large, shape)
    heads = shape[0] * shape[1]
    return Row(
        key="reducer_memory",
        title=f"Streaming reducer peak memory, {large} / {small} examples ({heads} heads)",
        value=peak_large / peak_small,
        op="<=",
        threshold=1.2,
        measured={
            f"peak_mib_{small}": peak_small / 2**20,
            f"peak_mib_{large}": peak_large / 2**20,
            f"seconds_{small}": seconds_small,
            f"seconds_{large}": seconds_large,
            f"materialised_mib_{large}": large * heads * shape[2] * 4 / 2**20,
        },
        note=(
            "tracemalloc peak of ClassSums + HeadHits over chunks of 100 examples from a "
            "generator (float32 vectors), deterministic; materialised_mib is what holding them "
            "all would take"
        ),
        if_missed="the peak grew with the examples: some per-example array is being kept",
    )


# 5. Early exit ---------------------------------------------------------------------------------


def first_quarter_artifact(
    info: BaseModelInfo, k: int = 20, classes: int = 3, seed: int = 0
) -> SavArtifact:
    """A SAV whose k heads all lie in the first quarter of the layers (random centroids)."""
    quarter = max(1, info.num_layers // 4)
    pool = [(layer, head) for layer in range(quarter) for head in range(info.num_heads)]
    k = min(k, len(pool))
    rng = np.random.default_rng(seed)
    heads = np.array(pool, dtype=np.int64)[rng.choice(len(pool), size=k, replace=False)]
    labels = [f"class{c}" for c in range(classes)]
    return SavArtifact(
        labels=labels,
        heads=heads,
        centroids=rng.standard_normal((classes, k, info.head_dim)).astype(np.float32),
        base_model=info,
        prompt=PromptConfig(),
        selection=Selection("paper", k, dict.fromkeys(labels, 1), [1.0] * k),
    )


def early_exit(
    lm: LoadedModel, example: Example, prompt: PromptConfig, reps: int, clock: str = "wall"
) -> Row:
    """Latency of one input: `predict_examples` with heads in the first quarter of the layers
    (stops after the deepest of them) against capturing every layer of a full forward."""
    artifact = first_quarter_artifact(lm.info)
    inputs = _on_device(lm, [example], prompt)
    layers = needed_layers(artifact)
    device = lm.input_device
    t = timed_rounds(
        {
            "early": lambda: predict_examples(lm, artifact, [example]),
            "full": lambda: capture_examples(lm, [example], prompt),
        },
        reps,
        device=device,
    )
    forward = timed_rounds(
        {
            "early_forward": lambda: capture_inputs(lm, inputs, layers, early_exit=True),
            "full_forward": lambda: capture_inputs(lm, inputs),
        },
        reps,
        device=device,
    )
    s, measured = paired_figures(t, "early", "full", clock, device)
    fs = Spread.of(forward.ratios("early_forward", "full_forward", clock))
    early_ms = 1e3 * median(t.on(clock)["early"])
    early_forward_ms = 1e3 * median(forward.on(clock)["early_forward"])
    ideal = (artifact.deepest_layer + 1) / lm.info.num_layers
    return Row(
        key="early_exit",
        title="Early exit: latency with heads in the first quarter of the layers / full forward",
        **spread_fields(s, clock),
        op="<=",
        threshold=0.35,
        measured={
            **measured,
            "forward_only_ratio_p50": fs.median,
            "forward_only_ratio_q1": fs.q1,
            "forward_only_ratio_q3": fs.q3,
            "deepest_layer": artifact.deepest_layer,
            "layers": lm.info.num_layers,
            "ideal_ratio": ideal,
        },
        note=(
            "one input, end to end (tokenise and preprocess the image, forward, vote); "
            f"forward_only_ratio ({clock} time) leaves out the tokeniser and image processor, "
            "which early exit cannot shorten"
        ),
        if_missed=(
            f"tokenising the prompt and preprocessing the image take about "
            f"{max(0.0, early_ms - early_forward_ms):.0f} ms of the {early_ms:.0f} ms whatever the "
            f"depth; the forward alone is at {fs.median:.2f} (ideal {ideal:.2f}). With a 7B model "
            "the forward dominates and the ratio approaches the forward's"
        ),
    )


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    if isinstance(x, int | np.integer) or (
        isinstance(x, float) and x.is_integer() and abs(x) < 1e6
    ):
        return f"{int(x)}"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _fmt_spread(row: Row) -> str:
    if not math.isfinite(row.value):
        return "n/a"
    return "0" if row.low == row.high else f"{_fmt(row.low)} - {_fmt(row.high)}"


def markdown(rows: list[Row], serving: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The README table: one line per row, then the serving load table and the notes."""
    lines = [
        "| # | Measure | Measured | Spread (IQR) | Target | Verdict |",
        "|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows, 1):
        lines.append(
            f"| {i} | {row.title} | {_fmt(row.value)} | {_fmt_spread(row)} | {row.target} "
            f"| {row.verdict} |"
        )
    if serving:
        lines += [
            "",
            "| Serving | Clients | p50 ms | p95 ms | req/s | req/s IQR | rounds | errors |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in serving:
            lines.append(
                f"| {s['config']} | {s['clients']} | {_fmt(s['p50_ms'])} | {_fmt(s['p95_ms'])} "
                f"| {_fmt(s['requests_per_s'])} | {_fmt(s['requests_per_s_q1'])} - "
                f"{_fmt(s['requests_per_s_q3'])} | {s['rounds']} | {s['errors']} |"
            )
    lines += ["", "Details:"]
    for i, row in enumerate(rows, 1):
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in row.measured.items())
        spread = f" Spread: {row.spread}." if row.spread else ""
        lines.append(f"{i}. `{row.key}`: {figures}. {row.note}.{spread}")
        if row.verdict == "miss":
            lines.append(f"   Missed: {row.if_missed}.")
        elif row.verdict == "unclear":
            lines.append(
                f"   Unclear: the spread {_fmt_spread(row)} straddles the target {row.target}."
            )
    lines += ["", "Run: " + ", ".join(f"{k}={v}" for k, v in header.items())]
    return "\n".join(lines) + "\n"
