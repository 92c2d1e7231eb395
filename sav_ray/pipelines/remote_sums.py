"""The class-sums total of a fit, held by a small Ray actor instead of the driver.

At 1000 classes and Qwen2-VL-7B geometry the float64 total `[class, layer, head, head_dim]` is
766 MiB and the unit centroids head scoring needs are 383 MiB more. The driver passes each
block's partial (`reduce.ClassSums` of the classes in that block) to the actor by ObjectRef,
never fetching it; the actor adds it to the total in place, builds the `ScoringCentroids` and
puts them in the object store itself, and hands the driver only what is small: the counts,
the block's other columns (rows the model ran, model info, ...) and the selected heads'
centroids.

    sums, columns = accumulate(labels, partials)  # partials: a Ray dataset of block partials
    scoring = sums.scoring("paper")               # ObjectRef[reduce.ScoringCentroids]
    centroids = sums.centroids(heads)             # [class, k, head_dim] float32
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any

import numpy as np

from sav_ray.core import reduce

SUMS_COLUMNS = ("present", "sums", "counts")  # a block partial's columns that stay in the actor

# Partials handed to the actor and not yet added: each holds its block in the object store
# (up to ~140 MiB at 1000 classes), and not taking more from the dataset holds it back too.
MAX_PENDING = 2


class ClassSumsHolder:
    """Ray actor: the total of the block partials, a row per label."""

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = tuple(labels)
        self.total: reduce.ClassSums | None = None

    def add(self, block: Any, rows: tuple[int, int] | None) -> dict[str, list]:
        """Add a block of partials (rows `start, stop` of it, or all) to the total; return its
        other columns, which are small."""
        from ray.data.block import BlockAccessor

        accessor = BlockAccessor.for_block(block)
        if rows is not None:
            accessor = BlockAccessor.for_block(accessor.slice(*rows, copy=False))
        batch = accessor.to_batch_format("numpy")
        for present, sums, counts in zip(*(batch[c] for c in SUMS_COLUMNS), strict=True):
            part = reduce.ClassSums(self.labels, sums, counts, present=present)
            if self.total is None:  # [class, layer, head, head_dim] float64
                self.total = reduce.ClassSums.zeros(self.labels, part.shape)
            self.total.add(part)
        return {c: values.tolist() for c, values in batch.items() if c not in SUMS_COLUMNS}

    def summary(self) -> tuple[np.ndarray, tuple[int, int, int]] | None:
        """Counts [class] and (layer, head, head_dim); None before any partial."""
        return None if self.total is None else (self.total.counts, self.total.shape)

    def scoring(self, method: str) -> list[Any]:
        """[ObjectRef of the ScoringCentroids]: put by this actor, so they never pass through
        the driver (a bare ObjectRef as a result would be resolved by the caller's get)."""
        import ray

        return [ray.put(reduce.ScoringCentroids.of(self.total, method))]

    def centroids(self, heads: np.ndarray | None) -> np.ndarray:
        return self.total.centroids(heads)


class RemoteClassSums:
    """The driver's view of the actor's total: labels, counts and shape are here; the sums
    are not. Count checks run here, so a user's mistake is a plain `ReduceError`."""

    def __init__(
        self,
        holder: Any,
        labels: tuple[str, ...],
        counts: np.ndarray,
        shape: tuple[int, int, int],
    ) -> None:
        self.holder = holder  # the actor lives as long as this handle
        self.labels = labels
        self.counts = counts  # [class] int64
        self.shape = shape  # (layer, head, head_dim)

    def scoring(self, method: str) -> Any:
        """ObjectRef of `reduce.ScoringCentroids.of(total, method)`, built in the actor."""
        import ray

        reduce.require_examples(self.labels, self.counts, method)
        return ray.get(self.holder.scoring.remote(method))[0]

    def centroids(self, heads: np.ndarray | None = None) -> np.ndarray:
        """As `reduce.ClassSums.centroids`: [class, k, head_dim] float32 for heads [k, 2], or
        [class, layer, head, head_dim] for every head."""
        import ray

        reduce.require_examples(self.labels, self.counts, None)
        return ray.get(self.holder.centroids.remote(heads))


def accumulate(labels: tuple[str, ...], partials: Any) -> tuple[RemoteClassSums, dict[str, list]]:
    """Add up a Ray dataset of block partials (columns `SUMS_COLUMNS` and any small others) in
    an actor; return its handle and, per other column, the values of every block."""
    import ray

    labels = tuple(labels)
    # No CPU: the model actors and the tasks making the partials may hold every CPU there is.
    holder = ray.remote(num_cpus=0)(ClassSumsHolder).remote(labels)
    columns: dict[str, list] = defaultdict(list)
    pending: deque[Any] = deque()

    def collect() -> None:
        for column, values in ray.get(pending.popleft()).items():
            columns[column].extend(values)

    # Block refs (Ray Data's developer API), so the partials go from the object store to the
    # actor without the driver ever fetching one.
    for bundle in partials.iter_internal_ref_bundles():
        for entry, piece in zip(bundle.blocks, bundle.slices, strict=True):
            rows = None if piece is None else (piece.start_offset, piece.end_offset)
            pending.append(holder.add.remote(entry.ref, rows))
            if len(pending) > MAX_PENDING:
                collect()
    while pending:
        collect()
    summary = ray.get(holder.summary.remote())
    if summary is None:
        raise reduce.ReduceError("the vectors dataset has no rows; nothing to fit")
    counts, shape = summary
    return RemoteClassSums(holder, labels, counts, tuple(shape)), dict(columns)
