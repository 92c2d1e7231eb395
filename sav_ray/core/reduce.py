"""The SAV reducer: class sums, head scores, head selection and voting, in pure numpy.

Pipeline (docs/design.md, "Selection and voting"):
  1. `ClassSums.from_batch` per batch of vectors, `merge` the partials (any order) -> `centroids()`.
     With `present_only=True` a batch's partial holds only the classes in it, so its size does
     not grow with the label set; `add` accumulates such partials into one total in place.
  2. `head_hits` per batch against the merged sums (or the `ScoringCentroids` built from them
     once and shared by every batch), `merge` the partials -> `scores()`.
  3. `select_heads(scores, k)`: higher score first, ties to the lower (layer, head).
  4. At inference: `classify(gather_heads(x, heads), centroids)`: each head votes for its
     nearest centroid; most votes wins; a tie goes to the tied class the highest-ranked head chose.

Similarity is cosine everywhere. A zero vector has similarity 0 with everything (no NaN), and
the nearest centroid is the first maximum, so ties go to the lowest class index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SELECTION_METHODS = ("paper", "loo")

# Size of one float64 array of a `head_hits` group of heads: small enough that a group's rows
# stay in the CPU's cache between the copy and the product. 1 MiB measured 1.4x faster than
# 32 MiB for `paper` and 2x for `loo` (1000-2000 rows x 784 heads x 128, 3 and 100 classes).
_CHUNK_BYTES = 1 * 2**20
_CHUNK_ROWS = 256  # `head_hits` rows at a time: the unit centroids are read once per chunk


class ReduceError(ValueError):
    """A user-facing problem with the examples, labels or selection settings."""


def _check_label_idx(label_idx: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    label_idx = np.asarray(label_idx)
    if label_idx.shape != (n,) or (n and label_idx.dtype.kind not in "iu"):
        raise ReduceError(
            f"label_idx must be {n} integer class indices (one per vector row); "
            f"got shape {label_idx.shape} dtype {label_idx.dtype}"
        )
    if n and (label_idx.min() < 0 or label_idx.max() >= num_classes):
        raise ReduceError(f"label_idx values must be in [0, {num_classes}); got {label_idx}")
    return label_idx.astype(np.int64)


def _unit(x: np.ndarray) -> np.ndarray:
    """x / ||x|| over the last axis in float64; zero vectors stay zero, so cosine is 0, not NaN."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _require_count(labels: tuple[str, ...], counts: np.ndarray, minimum: int, why: str) -> None:
    for label, count in zip(labels, counts, strict=True):
        if count < minimum:
            examples = "example" if count == 1 else "examples"
            raise ReduceError(
                f"class {label!r} has {count} {examples}; {why} needs at "
                f"least {minimum} per class: add examples of {label!r} or drop the label"
            )


def require_examples(labels: tuple[str, ...], counts: np.ndarray, method: str | None) -> None:
    """Every class has what a centroid (`method` None) or `method` selection needs: one
    example, two for `loo` (its centroid without the example itself)."""
    if method is None:
        _require_count(labels, counts, 1, "a centroid")
    else:
        _check_method(method)
        _require_count(labels, counts, 2 if method == "loo" else 1, f"{method} selection")


@dataclass(eq=False)
class ClassSums:
    """Per-class sums and counts of head vectors: mergeable partials, the reducer's only state.

    `present` None: a row per label. Otherwise the ascending label indices the rows are for
    (a batch's partial sized by the classes in it, not by the label set).
    """

    labels: tuple[str, ...]  # class order
    sums: np.ndarray  # [class, layer, head, head_dim] float64 (class: all, or `present`)
    counts: np.ndarray  # [class] int64
    present: np.ndarray | None = None  # [present] int64 label indices, ascending

    def __post_init__(self) -> None:
        self.labels = tuple(self.labels)
        if len(set(self.labels)) != len(self.labels):
            raise ReduceError(f"labels must be distinct; got {list(self.labels)}")
        rows = len(self.labels)
        if self.present is not None:
            self.present = np.asarray(self.present, dtype=np.int64)
            rows = len(self.present)
            assert (np.diff(self.present) > 0).all(), self.present
            assert not rows or 0 <= self.present[0] <= self.present[-1] < len(self.labels)
        assert self.sums.ndim == 4 and self.sums.shape[0] == rows, self.sums.shape
        assert self.counts.shape == (rows,), self.counts.shape

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layer, head, head_dim)."""
        return tuple(self.sums.shape[1:])

    @classmethod
    def zeros(cls, labels, shape: tuple[int, int, int], present=None) -> ClassSums:
        labels = tuple(labels)
        rows = len(labels) if present is None else len(present)
        return cls(
            labels,
            np.zeros((rows, *shape), dtype=np.float64),
            np.zeros(rows, dtype=np.int64),
            present,
        )

    @classmethod
    def from_batch(
        cls, labels, vectors: np.ndarray, label_idx: np.ndarray, present_only: bool = False
    ) -> ClassSums:
        """vectors [n, layer, head, head_dim] (any float dtype), label_idx [n] indices into labels.

        `present_only`: rows only for the classes in the batch (its size then depends on those
        alone); otherwise a row per label.
        """
        vectors = np.asarray(vectors)
        if vectors.ndim != 4:
            raise ReduceError(f"vectors must be [n, layer, head, head_dim]; got {vectors.shape}")
        labels = tuple(labels)
        label_idx = _check_label_idx(label_idx, len(vectors), len(labels))
        classes = np.unique(label_idx)  # [present]
        out = cls.zeros(labels, vectors.shape[1:], classes if present_only else None)
        for row, c in enumerate(classes):
            at = row if present_only else c
            rows = vectors[label_idx == c]  # [n_c, layer, head, head_dim]
            out.sums[at] = rows.sum(axis=0, dtype=np.float64)
            out.counts[at] = len(rows)
        return out

    def _check_mergeable(self, other: ClassSums) -> None:
        if self.labels != other.labels:
            raise ReduceError(
                f"cannot merge class sums with different labels: {self.labels} vs {other.labels}"
            )
        if self.shape != other.shape:
            raise ReduceError(
                f"cannot merge class sums of shape {self.sums.shape} and {other.sums.shape}: "
                "vectors from different models or layers"
            )

    def merge(self, other: ClassSums) -> ClassSums:
        """A new ClassSums: a row per label if either has one, else the union of their classes."""
        self._check_mergeable(other)
        if self.present is None and other.present is None:
            return ClassSums(self.labels, self.sums + other.sums, self.counts + other.counts)
        present = (
            None
            if self.present is None or other.present is None
            else np.union1d(self.present, other.present)
        )
        return ClassSums.zeros(self.labels, self.shape, present).add(self).add(other)

    def add(self, other: ClassSums) -> ClassSums:
        """Add `other` into this one in place (one class row at a time: no copy of the total);
        its classes must be among this one's. Returns self."""
        self._check_mergeable(other)
        theirs = np.arange(len(self.labels)) if other.present is None else other.present
        if self.present is None:
            rows = theirs
        else:
            rows = np.searchsorted(self.present, theirs)
            if not np.array_equal(self.present[np.minimum(rows, len(self.present) - 1)], theirs):
                raise ReduceError("cannot add class sums whose classes are not among these")
        for mine, row in enumerate(rows.tolist()):
            self.sums[row] += other.sums[mine]
        self.counts[rows] += other.counts
        return self

    def _require_examples(self, method: str | None) -> None:
        if self.present is not None:
            why = "a centroid" if method is None else f"{method} selection"
            raise ReduceError(f"{why} needs a row per label; merge the partials into a total")
        require_examples(self.labels, self.counts, method)

    def centroids(self, heads: np.ndarray | None = None) -> np.ndarray:
        """Class means [class, layer, head, head_dim] float32; given heads [k, 2] (layer, head),
        only theirs, [class, k, head_dim] (the same values, without a mean of every head)."""
        self._require_examples(None)
        sums = self.sums if heads is None else gather_heads(self.sums, heads)
        counts = self.counts.reshape(-1, *[1] * (sums.ndim - 1))  # [class, 1, ...]
        return (sums / counts).astype(np.float32)


@dataclass(eq=False)
class ScoringCentroids:
    """What head scoring compares examples with, built once from the merged class sums and
    shared by every batch: unit class means, and for `loo` the class sums themselves."""

    labels: tuple[str, ...]
    counts: np.ndarray  # [class] int64
    unit: np.ndarray  # [layer*head, head_dim, class] float32 unit class means, one matrix a head
    shape: tuple[int, int, int]  # (layer, head, head_dim)
    sums: np.ndarray | None = None  # [class, layer*head, head_dim] float64; `loo` needs them

    @classmethod
    def of(cls, sums: ClassSums, method: str, class_chunk: int = 64) -> ScoringCentroids:
        """`class_chunk` classes are normalised at a time, so no float64 copy of all the sums
        is made; each class's unit vector is the same as normalising all at once."""
        sums._require_examples(method)
        num_layers, num_heads, head_dim = sums.shape
        class_sums = sums.sums.reshape(len(sums.labels), -1, head_dim)  # [class, l*h, head_dim]
        # [layer*head, head_dim, class]: each head's centroids a contiguous matrix for the products
        unit = np.empty(class_sums.shape[1:] + class_sums.shape[:1], dtype=np.float32)
        for start in range(0, len(class_sums), class_chunk):
            chunk = _unit(class_sums[start : start + class_chunk])  # [chunk, l*h, head_dim]
            unit[:, :, start : start + class_chunk] = chunk.transpose(1, 2, 0)
        return cls(
            sums.labels,
            sums.counts,
            unit,
            sums.shape,
            class_sums if method == "loo" else None,
        )


@dataclass(eq=False)
class HeadHits:
    """Per-head counts of examples whose nearest centroid is their own class: mergeable partials."""

    hits: np.ndarray  # [layer, head] int64
    n: int  # examples counted

    @classmethod
    def zeros(cls, shape: tuple[int, int]) -> HeadHits:
        return cls(np.zeros(shape, dtype=np.int64), 0)

    def merge(self, other: HeadHits) -> HeadHits:
        if self.hits.shape != other.hits.shape:
            raise ReduceError(f"cannot merge head hits {self.hits.shape} and {other.hits.shape}")
        return HeadHits(self.hits + other.hits, self.n + other.n)

    def scores(self) -> np.ndarray:
        """Fraction of examples each head classifies correctly, [layer, head] float64."""
        if self.n == 0:
            raise ReduceError("no examples were scored; cannot compute head scores")
        return self.hits / self.n


def _check_method(method: str) -> None:
    if method not in SELECTION_METHODS:
        raise ReduceError(f"unknown selection method {method!r}; choose one of {SELECTION_METHODS}")


def head_hits(
    vectors: np.ndarray,
    label_idx: np.ndarray,
    sums: ClassSums | ScoringCentroids,
    method: str,
    chunk_size: int | None = None,
) -> HeadHits:
    """Count, per head, the examples of this batch whose nearest class centroid is their own.

    vectors [n, layer, head, head_dim] must be examples already counted in `sums` (for `loo`,
    each is removed from its own class sum). Sums stand in for means: cosine ignores scale.
    Given `ScoringCentroids.of(sums, method)`, the centroids are not normalised again per batch.
    `chunk_size` rows are processed at a time (default 256), in cache-sized groups of heads
    (about 1 MiB per float64 array): with many classes, a chunk of few rows would read every
    head's centroids (0.4 GB at 1000 classes x 28 x 28 x 128) for only those rows.
    """
    _check_method(method)
    vectors = np.asarray(vectors)
    if vectors.ndim != 4 or vectors.shape[1:] != sums.shape:
        raise ReduceError(
            f"vectors must be [n, {', '.join(map(str, sums.shape))}] to match the class sums "
            f"[layer, head, head_dim]; got {vectors.shape}"
        )
    num_classes = len(sums.labels)
    label_idx = _check_label_idx(label_idx, len(vectors), num_classes)
    if isinstance(sums, ScoringCentroids):
        require_examples(sums.labels, sums.counts, method)
        if method == "loo" and sums.sums is None:
            raise ReduceError("loo selection needs ScoringCentroids.of(sums, 'loo')")
        scoring = sums
    else:
        scoring = ScoringCentroids.of(sums, method)

    n, num_layers, num_heads, head_dim = vectors.shape
    lh = num_layers * num_heads
    class_sums = scoring.sums  # [class, layer*head, head_dim] float64 (loo only)
    # The nearest centroid by cosine does not depend on the example's own length, so examples
    # are not normalised: float32 products against unit centroids (6x faster than float64
    # cosines, same argmax up to float32 rounding of near-exact ties).
    unit_sums = scoring.unit  # [layer*head, head_dim, class]
    chunk_size = chunk_size or _CHUNK_ROWS
    assert chunk_size >= 1, chunk_size

    hits = np.zeros(lh, dtype=np.int64)
    for start in range(0, n, chunk_size):
        rows = vectors[start : start + chunk_size].reshape(-1, lh, head_dim)  # [b, l*h, head_dim]
        y = label_idx[start : start + chunk_size]  # [b]
        step = max(1, _CHUNK_BYTES // (8 * len(y) * max(head_dim, num_classes)))  # heads
        for first in range(0, lh, step):
            h = slice(first, first + step)
            x = np.ascontiguousarray(rows[:, h].transpose(1, 0, 2), dtype=np.float32)
            sims = x @ unit_sums[h]  # [heads, b, class]
            if method == "loo":
                # [b, heads, head_dim]
                own = _unit(class_sums[y, h] - x.transpose(1, 0, 2)).astype(np.float32)
                sims[:, np.arange(len(y)), y] = np.einsum("hbd,bhd->hb", x, own)
            nearest = sims.argmax(axis=-1)  # [heads, b]; first maximum = lowest class index
            hits[h] += (nearest == y).sum(axis=1)
    return HeadHits(hits.reshape(num_layers, num_heads), n)


def rank_heads(scores: np.ndarray) -> np.ndarray:
    """All heads as [layer*head, 2] (layer, head) rows, best first.

    Higher score first; exactly equal scores go to the lower (layer, head).
    """
    scores = np.asarray(scores, dtype=np.float64)  # [layer, head]
    if scores.ndim != 2 or not np.isfinite(scores).all():
        raise ReduceError(f"head scores must be a finite [layer, head] array; got {scores.shape}")
    flat = scores.ravel()
    # lexsort sorts by its last key first; the flat index is row-major, i.e. (layer, head) order.
    order = np.lexsort((np.arange(flat.size), -flat))
    return np.stack(np.divmod(order, scores.shape[1]), axis=1).astype(np.int64)


def select_heads(scores: np.ndarray, k: int) -> np.ndarray:
    """The top k heads, [k, 2] int64 (layer, head), best first."""
    scores = np.asarray(scores)
    total = scores.size
    if not 1 <= k <= total:
        raise ReduceError(
            f"--num-heads must be between 1 and {total} (the model's layers x heads); got {k}"
        )
    return rank_heads(scores)[:k]


def gather_heads(x: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """x [..., layer, head, head_dim], heads [k, 2] (layer, head) -> [..., k, head_dim]."""
    heads = np.asarray(heads, dtype=np.int64)
    num_layers, num_heads = x.shape[-3:-1]
    if heads.ndim != 2 or heads.shape[1] != 2:
        raise ReduceError(f"heads must be [k, 2] (layer, head) pairs; got {heads.shape}")
    bad = (heads < 0).any(axis=1) | (heads[:, 0] >= num_layers) | (heads[:, 1] >= num_heads)
    if bad.any():
        raise ReduceError(
            f"heads {heads[bad].tolist()} are outside the model's "
            f"{num_layers} layers x {num_heads} heads"
        )
    return x[..., heads[:, 0], heads[:, 1], :]


def nearest_centroid(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """vectors [n, k, head_dim], centroids [class, k, head_dim] -> [n, k] class index per head."""
    vectors, centroids = np.asarray(vectors), np.asarray(centroids)
    if vectors.ndim != 3 or centroids.ndim != 3 or vectors.shape[1:] != centroids.shape[1:]:
        raise ReduceError(
            f"vectors [n, k, head_dim] {vectors.shape} do not match "
            f"centroids [class, k, head_dim] {centroids.shape}"
        )
    sims = _unit(vectors).transpose(1, 0, 2) @ _unit(centroids).transpose(1, 2, 0)  # [k, n, class]
    return sims.argmax(axis=-1).T  # [n, k]; first maximum = lowest class index


@dataclass(eq=False)
class Votes:
    """Result of head voting for n examples over C classes.

    `scores` are the vote shares votes / k: per example they are in [0, 1] and sum to 1.
    """

    label_idx: np.ndarray  # [n] int64 winning class index
    votes: np.ndarray  # [n, class] int64 heads voting for each class
    scores: np.ndarray  # [n, class] float64 votes / k


def vote(head_votes: np.ndarray, num_classes: int) -> Votes:
    """head_votes [n, k]: the class each selected head chose, heads in rank order (best first).

    Most votes wins; among tied classes, the one the highest-ranked head voted for wins,
    as `collections.Counter(row).most_common(1)` in the reference implementation.
    """
    head_votes = np.asarray(head_votes)
    if head_votes.ndim != 2 or head_votes.shape[1] < 1 or head_votes.dtype.kind not in "iu":
        raise ReduceError(f"head_votes must be [n, k>=1] class indices; got {head_votes.shape}")
    if head_votes.size and (head_votes.min() < 0 or head_votes.max() >= num_classes):
        raise ReduceError(f"head_votes must be class indices in [0, {num_classes})")
    n, k = head_votes.shape
    rows = np.arange(n)[:, None]  # [n, 1]
    votes = np.zeros((n, num_classes), dtype=np.int64)
    np.add.at(votes, (rows, head_votes), 1)
    tied = votes == votes.max(axis=1, keepdims=True)  # [n, class]
    first_tied_head = tied[rows, head_votes].argmax(axis=1)  # [n] best-ranked head on a top class
    winner = head_votes[np.arange(n), first_tied_head]  # [n]
    return Votes(winner.astype(np.int64), votes, votes / k)


def classify(vectors_k: np.ndarray, centroids: np.ndarray) -> Votes:
    """vectors_k [n, k, head_dim] (selected heads, rank order), centroids [class, k, head_dim]."""
    return vote(nearest_centroid(vectors_k, centroids), len(centroids))


def accuracy(predicted: np.ndarray, label_idx: np.ndarray) -> float:
    """Fraction of predicted class indices [n] equal to the true ones [n]."""
    predicted, label_idx = np.asarray(predicted), np.asarray(label_idx)
    if predicted.shape != label_idx.shape or predicted.size == 0:
        raise ReduceError(
            f"accuracy needs equal non-empty shapes; got {predicted.shape}, {label_idx.shape}"
        )
    return float((predicted == label_idx).mean())
