"""The fit on Ray Data: manifest -> model inputs (CPU tasks) -> model actors -> vectors ->
reducer -> artifact.

The model runs once per example. Everything after it is passes over the (materialised or
saved) vectors dataset that keep only fixed-size state: per-class sums and counts, then
per-head hit counts, then the top-k vote's hits. Each block returns a partial, and they are
merged one at a time, so memory does not grow with the number of examples. The class sums,
which grow with the classes, are merged in a Ray actor (`sav_ray.pipelines.remote_sums`), not the driver.

    artifact, stats = fit(FitConfig(model=..., train=..., output=...))
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sav_ray.core import calibration, reduce
from sav_ray.core.artifact import BaseModelInfo, Calibration, SavArtifact, Selection
from sav_ray.core.errors import ConfigError, quiet_ray_data_tracebacks, restore_stop_handlers
from sav_ray.core.manifest import check_image_files, read_manifest, validate_for_fit
from sav_ray.core.prompts import PromptConfig
from sav_ray.core.resolution import NO_LIMITS, Preprocessing, nothing_applied
from sav_ray.pipelines.config import FitConfig, ModelConfig
from sav_ray.pipelines.logs import quiet_ray_data, ray_init_kwargs
from sav_ray.pipelines.placement import AUTO
from sav_ray.pipelines.preprocess import preprocessing_applied, with_video_input
from sav_ray.pipelines.remote_sums import RemoteClassSums, accumulate

VECTORS_META = "sav_vectors.json"  # sidecar: model, prompt, preprocessing, labels


@dataclass
class FitStats:
    examples: int
    forward_rows: float  # rows the model ran; equals `examples` when each ran exactly once
    train_accuracy: float  # top-k vote on the training set
    wall_seconds: float
    extract_seconds: float  # manifest read to materialised vectors (0 with --from-vectors)
    placements: list[dict[str, Any]]  # one per model actor: {node, pid, gpu_ids, device}
    k_curve: calibration.LooCurve | None = None  # leave-one-out figures per candidate k
    forward_seconds: float = 0.0  # summed over the model actors' batches: the forward pass
    busy_seconds: float = 0.0  # and all of their __call__ (unpack, collate, move, capture)

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.extract_seconds if self.extract_seconds else float("nan")

    @property
    def forward_share(self) -> float:
        """Share of the model actors' busy time spent in the forward pass (NaN: no model ran)."""
        return self.forward_seconds / self.busy_seconds if self.busy_seconds else float("nan")


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), else start a local Ray."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        kwargs: dict[str, Any] = {"address": address, "log_to_driver": True, **ray_init_kwargs()}
        if address == "local":
            kwargs.update(num_cpus=num_cpus, include_dashboard=False)
        ray.init(**kwargs)
        restore_stop_handlers()  # ray.init replaced the job's SIGTERM handler
    quiet_ray_data()
    # Keep the core's own exception (e.g. "row 31: ...") instead of a generic UserCodeException,
    # so jobs can print the user's mistake rather than a remote traceback.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    quiet_ray_data_tracebacks()  # job_main prints one line and logs the traceback


def manifest_dataset(table: Any, block_rows: int) -> Any:
    """The normalised manifest as a Ray dataset in blocks of `block_rows` (parallel over actors)."""
    import ray

    n = table.num_rows
    return ray.data.from_arrow([table.slice(i, block_rows) for i in range(0, n, block_rows)])


# Preprocessing asks for a different CPU share than the model actors so Ray Data keeps it in
# its own tasks instead of fusing it into the actors, where it would stall the model.
PREPROCESS_CPUS = 0.5


def preprocessed_dataset(
    table: Any,
    model: ModelConfig,
    prompt: PromptConfig,
    preprocessing: Preprocessing,
    more_inputs: list[tuple[PromptConfig, Preprocessing]] = (),
) -> Any:
    """The manifest's rows as ready model inputs (column `inputs`, and one more column per pair
    of `more_inputs`: `preprocess_rows`), made in CPU tasks."""
    from sav_ray.pipelines.preprocess import preprocess_rows

    ds = manifest_dataset(table, model.batch_size)
    return ds.map_batches(
        preprocess_rows,
        fn_kwargs={
            "model": model.model,
            "revision": model.revision,
            "prompt": prompt.to_dict(),
            "preprocessing": preprocessing.to_dict(),
            "more_inputs": [(p.to_dict(), q.to_dict()) for p, q in more_inputs],
        },
        batch_size=model.batch_size,
        num_cpus=PREPROCESS_CPUS,
    )


def vectors_dataset(
    table: Any,
    model: ModelConfig,
    prompt: PromptConfig,
    vectors_dtype: str,
    preprocessing: Preprocessing = NO_LIMITS,
) -> Any:
    """Preprocess rows in CPU tasks, then run the model actor pool: one row of vectors per example."""
    from sav_ray.pipelines.extract import ExtractVectors
    from sav_ray.pipelines.placement import actor_pool

    ds = preprocessed_dataset(table, model, prompt, preprocessing)
    return ds.map_batches(
        ExtractVectors,
        fn_constructor_kwargs={
            "model": model,
            "vectors_dtype": vectors_dtype,
        },
        batch_size=model.batch_size,
        **actor_pool(model),
    )


def _label_index(labels: tuple[str, ...], values: np.ndarray) -> np.ndarray:
    lookup = {label: i for i, label in enumerate(labels)}
    return np.array([lookup[str(v)] for v in values], dtype=np.int64)  # [batch]


def _sums_of_block(batch: dict[str, np.ndarray], labels: tuple[str, ...]) -> dict[str, np.ndarray]:
    # Only the classes in this block: with many classes a row per label would make every
    # block's partial (and the driver's traffic) as large as the whole label set's sums.
    part = reduce.ClassSums.from_batch(
        labels, batch["vectors"], _label_index(labels, batch["label"]), present_only=True
    )
    out = {"present": part.present[None], "sums": part.sums[None], "counts": part.counts[None]}
    # Small per-block columns beside the sums come back to the driver (`first_pass`).
    if "forward_rows" in batch:  # fresh from the model actors, not read back from Parquet
        out["forward_rows"] = np.array([batch["forward_rows"].sum()])
        out["forward_seconds"] = np.array([batch["forward_seconds"].sum()])
        out["busy_seconds"] = np.array([batch["busy_seconds"].sum()])
        out["model_info"] = np.array([json.dumps(sorted(set(batch["model_info"])))])
        out["placement"] = np.array([json.dumps(sorted(set(batch["placement"])))])
    return out


def _hits_of_block(
    batch: dict[str, np.ndarray], scoring: Any, method: str
) -> dict[str, np.ndarray]:
    import ray

    centroids: reduce.ScoringCentroids = ray.get(scoring)  # zero-copy from the object store
    y = _label_index(centroids.labels, batch["label"])
    part = reduce.head_hits(batch["vectors"], y, centroids, method)
    return {"hits": part.hits[None], "n": np.array([part.n])}


def _vote_hits_of_block(
    batch: dict[str, np.ndarray], labels: tuple[str, ...], heads: np.ndarray, centroids: Any
) -> dict[str, np.ndarray]:
    import ray

    y = _label_index(labels, batch["label"])
    votes = reduce.classify(reduce.gather_heads(batch["vectors"], heads), ray.get(centroids))
    return {"correct": np.array([int((votes.label_idx == y).sum())]), "n": np.array([len(y)])}


def _partials(ds: Any, fn: Any, **kwargs: Any) -> Any:
    """A dataset of one partial per block, computed where the block lives, to be merged one
    at a time (so memory does not grow with the number of blocks). Large kwargs go as
    `ray.put` ObjectRefs, stored once and read by every task."""
    return ds.map_batches(fn, batch_size=None, fn_kwargs=kwargs, num_cpus=1)


@dataclass
class FirstPass:
    """What the first pass over the vectors gives the driver."""

    sums: RemoteClassSums  # the class sums, held by a Ray actor
    forward_rows: float  # rows the model ran (0 for saved vectors)
    forward_seconds: float  # the actors' forward passes, summed (0 for saved vectors)
    busy_seconds: float  # the actors' whole calls, summed
    info: BaseModelInfo | None  # the base model as the actors loaded it (None: saved vectors)
    placements: list[dict[str, Any]]  # where each model actor ran (sav_ray.pipelines.placement)


def first_pass(ds: Any, labels: tuple[str, ...]) -> FirstPass:
    """Class sums, and the small facts the model actors sent beside the vectors."""
    sums, small = accumulate(labels, _partials(ds, _sums_of_block, labels=labels))
    # small: column -> one value per block (absent for saved vectors: no model ran)
    forward_rows = float(sum(small.get("forward_rows", [])))
    forward_seconds = float(sum(small.get("forward_seconds", [])))
    busy_seconds = float(sum(small.get("busy_seconds", [])))
    infos = {info for block in small.get("model_info", []) for info in json.loads(block)}
    if len(infos) > 1:
        raise RuntimeError(f"model actors disagree on the base model: {sorted(infos)}")
    info = BaseModelInfo.from_dict(json.loads(infos.pop())) if infos else None
    placements = {p for block in small.get("placement", []) for p in json.loads(block)}
    placed = sorted((json.loads(p) for p in placements), key=str)
    return FirstPass(sums, forward_rows, forward_seconds, busy_seconds, info, placed)


def head_hits(ds: Any, sums: RemoteClassSums, method: str) -> reduce.HeadHits:
    # Normalised once, not per block: the unit centroids (+ the sums for loo) are 0.4 GB of
    # float32 at 1000 classes and 28 x 28 x 128, so they travel once, by reference.
    scoring = sums.scoring(method)
    total = reduce.HeadHits.zeros(sums.shape[:2])
    for p in _partials(ds, _hits_of_block, scoring=scoring, method=method).iter_rows():
        total = total.merge(reduce.HeadHits(p["hits"], int(p["n"])))
    return total


def _curve_of_block(
    batch: dict[str, np.ndarray],
    labels: tuple[str, ...],
    heads: np.ndarray,
    centroids: Any,
    counts: np.ndarray,
    ks: list[int],
) -> dict[str, np.ndarray]:
    import ray

    y = _label_index(labels, batch["label"])
    part = calibration.loo_curve(
        reduce.gather_heads(batch["vectors"], heads), y, ray.get(centroids), counts, ks
    )
    return {"correct": part.correct[None], "log_loss": part.log_loss[None], "n": np.array([part.n])}


def _positive_of_block(
    batch: dict[str, np.ndarray],
    labels: tuple[str, ...],
    heads: np.ndarray,
    centroids: np.ndarray,
    counts: np.ndarray,
    temperature: float,
    positive: int,
) -> dict[str, np.ndarray]:
    y = _label_index(labels, batch["label"])
    probs = calibration.loo_probabilities(
        reduce.gather_heads(batch["vectors"], heads), y, centroids, counts, temperature
    )  # [b, class]
    return {"p": probs[:, positive], "positive": y == positive}


@dataclass
class KChoice:
    """The heads kept and what the leave-one-out pass found (calibration.py)."""

    heads: np.ndarray  # [k, 2]
    centroids: np.ndarray  # [class, k, head_dim]
    temperature: float
    curve: calibration.LooCurve
    index: int  # of the chosen k in curve.ks


def choose_heads(
    ds: Any, sums: RemoteClassSums, scores: np.ndarray, num_heads: int | str
) -> KChoice:
    """The top heads (k = `num_heads`, or the k of `calibration.k_grid` with the best
    leave-one-out vote accuracy for `auto`) and the temperature of their probabilities, from
    one more pass over the vectors (no model)."""
    import ray

    if num_heads == AUTO:
        ks = calibration.k_grid(scores.size)
    else:
        ks = [len(reduce.select_heads(scores, int(num_heads)))]  # checks the range
    top = reduce.rank_heads(scores)[: ks[-1]]  # [K, 2]
    centroids = sums.centroids(top)  # [class, K, head_dim]
    curve = None
    labels = sums.labels
    for p in _partials(
        ds,
        _curve_of_block,
        labels=labels,
        heads=top,
        centroids=ray.put(centroids),
        counts=sums.counts,
        ks=ks,
    ).iter_rows():
        part = calibration.LooCurve(
            np.asarray(ks), calibration.TEMPERATURES, p["correct"], p["log_loss"], int(p["n"])
        )
        curve = part if curve is None else curve.merge(part)
    i = curve.choose()
    k = ks[i]
    return KChoice(top[:k], centroids[:, :k], curve.temperature(i), curve, i)


def loo_threshold(
    ds: Any, sums: RemoteClassSums, choice: KChoice, positive_label: str, target: str, value: float
) -> calibration.Threshold:
    """The threshold on p(positive_label) reaching the target on the training set's
    leave-one-out probabilities."""
    labels = sums.labels
    rows = _partials(
        ds,
        _positive_of_block,
        labels=labels,
        heads=choice.heads,
        centroids=choice.centroids,
        counts=sums.counts,
        temperature=choice.temperature,
        positive=labels.index(positive_label),
    ).take_all()
    p = np.array([r["p"] for r in rows])
    positive = np.array([bool(r["positive"]) for r in rows])
    flag = f"--target-{target}"
    try:
        t, precision, recall = calibration.choose_threshold(p, positive, target, value)
    except ValueError as e:
        raise ConfigError(f"{flag} {value}: {e}") from None
    return calibration.Threshold(positive_label, t, target, value, precision, recall)


def vote_accuracy(ds: Any, artifact: SavArtifact) -> float:
    import ray

    correct = n = 0
    for p in _partials(
        ds,
        _vote_hits_of_block,
        labels=tuple(artifact.labels),
        heads=artifact.heads,
        centroids=ray.put(artifact.centroids),
    ).iter_rows():
        correct, n = correct + int(p["correct"]), n + int(p["n"])
    return correct / n


def write_vectors(ds: Any, out_dir: str, meta: dict[str, Any]) -> None:
    """The vectors dataset (docs/design.md): Parquet rows `row`, `id`, `label`, `vectors`, plus a JSON sidecar."""
    path = Path(out_dir)
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"--save-vectors {out_dir}: folder is not empty; choose a new one")
    ds.select_columns(["row", "id", "label", "vectors"]).write_parquet(str(path))
    (path / VECTORS_META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_vectors(in_dir: str) -> tuple[Any, dict[str, Any]]:
    import ray

    meta_file = Path(in_dir) / VECTORS_META
    if not meta_file.is_file():
        raise ConfigError(
            f"--from-vectors {in_dir}: no {VECTORS_META}; give a folder written by --save-vectors"
        )
    meta = json.loads(meta_file.read_text())
    return ray.data.read_parquet(in_dir, file_extensions=["parquet"]), meta


def check_positive_label(cfg: FitConfig, labels: tuple[str, ...]) -> None:
    """--positive-label must be a label of the training set (checked before the model runs)."""
    if cfg.positive_label is not None and cfg.positive_label not in labels:
        raise ConfigError(
            f"--positive-label {cfg.positive_label!r}: not a label of the training set; the "
            f"labels are {list(labels)}"
        )


def fit(cfg: FitConfig, table: Any | None = None) -> tuple[SavArtifact, FitStats]:
    """Run the whole fit and return the artifact (not yet written) and its stats. `table`: the
    training manifest as `read_manifest(cfg.train, cfg.manifest_fields)` gave it and
    `check_image_files` passed it (a job that checked it before Ray started), else read here."""
    started = time.perf_counter()
    if cfg.from_vectors:
        init_ray()
        ds, meta = read_vectors(cfg.from_vectors)
        labels, prompt = tuple(meta["labels"]), PromptConfig.from_dict(meta["prompt"])
        check_positive_label(cfg, labels)
        # Sidecars written before resolution limits existed have none: processor defaults.
        recorded = meta.get("preprocessing") or {}
        prep = Preprocessing.from_dict(recorded)
        applied = recorded.get("applied") or nothing_applied()
        info = BaseModelInfo.from_dict(meta["base_model"])
        ds = ds.materialize()
    else:
        info = None
        if table is None:
            table = read_manifest(cfg.train, cfg.manifest_fields)
            check_image_files(table)
        labels = validate_for_fit(table, cfg.selection)
        check_positive_label(cfg, labels)
        prompt, prep = cfg.prompt, cfg.preprocessing
        applied = preprocessing_applied(cfg.model, cfg.revision, prep)
        prep = with_video_input(cfg.model, cfg.revision, prep)
        init_ray()  # only once the manifest is known to be good
        ds = vectors_dataset(table, cfg, prompt, cfg.vectors_dtype, prep).materialize()
    extract_seconds = 0.0 if cfg.from_vectors else time.perf_counter() - started
    first = first_pass(ds, labels)
    sums, info = first.sums, first.info or info
    if cfg.save_vectors:  # before selection: a bad --num-heads must not cost the model pass
        meta = {
            "labels": list(labels),
            "base_model": info.to_dict(),
            "prompt": prompt.to_dict(),
            "preprocessing": {**prep.to_dict(), "applied": applied},
            "vectors_dtype": cfg.vectors_dtype,
        }
        write_vectors(ds, cfg.save_vectors, meta)
    scores = head_hits(ds, sums, cfg.selection).scores()  # [layer, head]
    choice = choose_heads(ds, sums, scores, cfg.num_heads)
    heads, centroids = choice.heads, choice.centroids  # [k, 2], [class, k, head_dim]
    threshold = None
    if cfg.positive_label:
        target, value = (
            ("precision", cfg.target_precision)
            if cfg.target_precision is not None
            else ("recall", cfg.target_recall)
        )
        threshold = loo_threshold(ds, sums, choice, cfg.positive_label, target, value)
    artifact = SavArtifact(
        labels=list(labels),
        heads=heads,
        centroids=centroids.astype(np.float32),
        base_model=info,
        prompt=prompt,
        preprocessing=prep,
        preprocessing_applied=applied,
        selection=Selection(
            method=cfg.selection,
            k=len(heads),
            examples_per_class={lab: int(c) for lab, c in zip(labels, sums.counts, strict=True)},
            scores=[float(scores[layer, head]) for layer, head in heads],
        ),
        head_scores=scores.astype(np.float32),
        calibration=Calibration(
            temperature=choice.temperature,
            loo_log_loss=float(choice.curve.best_log_loss()[0][choice.index]),
            loo_accuracy=float(choice.curve.accuracy()[choice.index]),
        ),
        decision=cfg.decision,
        threshold=threshold,
    )
    stats = FitStats(
        examples=int(sums.counts.sum()),
        forward_rows=first.forward_rows,
        train_accuracy=vote_accuracy(ds, artifact),
        wall_seconds=time.perf_counter() - started,
        extract_seconds=extract_seconds,
        placements=first.placements,
        k_curve=choice.curve,
        forward_seconds=first.forward_seconds,
        busy_seconds=first.busy_seconds,
    )
    return artifact, stats
