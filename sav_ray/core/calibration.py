"""Probabilities a user can threshold, and k chosen from the data, in pure numpy.

A SAV's vote share (votes / k) takes k + 1 values and is not a probability. Beside it, a SAV
gives per-class probabilities from the same selected heads:

    s_c(x) = mean over the k selected heads h of cos(x_h, centroid_{c,h})      (in [-1, 1])
    p(c | x) = softmax_c(s_c(x) / T)

The temperature T is fitted on the training set, leave-one-out: each training example is
compared with its own class's centroid computed without it (the other classes' centroids are
unchanged), and T minimises the log loss of those leave-one-out probabilities over a
log-spaced grid (`TEMPERATURES`, 1e-3 to 10, steps of 10%). Leave-one-out matters: an example
is always near a centroid it is part of, so fitting on plain similarities would make T too
small and the probabilities overconfident.

`--num-heads auto` picks k from `K_GRID` (and all heads) by the leave-one-out accuracy of the
vote, ties broken by the lower log loss (at its best T), then by the smaller k. Both come from
one streaming pass over the training vectors (`loo_curve` per block, `LooCurve.merge`), with
heads in rank order, without running the model again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sav_ray.core.reduce import ReduceError, _unit, vote

K_GRID = (1, 2, 3, 5, 10, 20, 40, 80, 160)  # and all heads
TEMPERATURES = np.geomspace(1e-3, 10.0, 97)  # consecutive values 10% apart
_CHUNK_FLOATS = 4_000_000  # rows x heads x classes of one chunk of similarities


def k_grid(num_heads: int) -> list[int]:
    """The candidate k of `--num-heads auto` for a model with `num_heads` heads in all."""
    return sorted({k for k in K_GRID if k < num_heads} | {num_heads})


def mean_similarities(vectors_k: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """vectors_k [n, k, head_dim], centroids [class, k, head_dim] -> [n, class]: each class's
    cosine similarity averaged over the k heads."""
    x, c = _unit(vectors_k), _unit(centroids)  # float64
    return np.einsum("nkd,ckd->nc", x, c) / x.shape[1]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax [n, class], rows summing to 1."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def probabilities(vectors_k: np.ndarray, centroids: np.ndarray, temperature: float) -> np.ndarray:
    """p(class | x) [n, class] = softmax(mean cosine similarity / temperature)."""
    return softmax(mean_similarities(vectors_k, centroids) / temperature)


def _loo_similarities(
    x: np.ndarray, y: np.ndarray, means: np.ndarray, unit_means: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """x [b, K, D] training examples' vectors (float64), y [b]; means [C, K, D] class means
    over the whole training set (these examples included) and their unit vectors; counts [C]
    -> cosine similarities [b, K, C], each example's own class compared with its class's
    centroid without it (zero when it is the class's only example)."""
    ux = _unit(x)
    sims = np.einsum("bkd,ckd->bkc", ux, unit_means)
    others = counts[y, None, None] * means[y] - x  # [b, K, D]: the sum of the class's others
    sims[np.arange(len(y)), :, y] = np.einsum("bkd,bkd->bk", ux, _unit(others))
    return sims


@dataclass(eq=False)
class LooCurve:
    """Leave-one-out figures for each candidate k: mergeable partials over blocks of examples."""

    ks: np.ndarray  # [g] candidate k, ascending
    temperatures: np.ndarray  # [t]
    correct: np.ndarray  # [g] int64 examples whose leave-one-out vote is right
    log_loss: np.ndarray  # [g, t] float64 sums of -log p(true class)
    n: int

    def merge(self, other: LooCurve) -> LooCurve:
        if not (
            np.array_equal(self.ks, other.ks) and len(self.temperatures) == len(other.temperatures)
        ):
            raise ReduceError("cannot merge leave-one-out curves over different k or temperatures")
        return LooCurve(
            self.ks,
            self.temperatures,
            self.correct + other.correct,
            self.log_loss + other.log_loss,
            self.n + other.n,
        )

    def accuracy(self) -> np.ndarray:
        """[g] leave-one-out vote accuracy per k."""
        return self.correct / max(self.n, 1)

    def best_log_loss(self) -> tuple[np.ndarray, np.ndarray]:
        """([g] mean log loss at each k's best temperature, [g] that temperature)."""
        mean = self.log_loss / max(self.n, 1)  # [g, t]
        best = mean.argmin(axis=1)
        return mean[np.arange(len(self.ks)), best], self.temperatures[best]

    def choose(self) -> int:
        """Index of the chosen k: highest accuracy, then lowest log loss, then smallest k."""
        loss, _ = self.best_log_loss()
        order = np.lexsort((self.ks, loss, -self.accuracy()))
        return int(order[0])

    def temperature(self, index: int) -> float:
        return float(self.best_log_loss()[1][index])


def loo_curve(
    vectors_k: np.ndarray,
    label_idx: np.ndarray,
    centroids: np.ndarray,
    counts: np.ndarray,
    ks: list[int],
    temperatures: np.ndarray = TEMPERATURES,
) -> LooCurve:
    """One block's LooCurve. vectors_k [n, K, D]: training examples' vectors of the top K heads
    in rank order (K = max(ks)); centroids [C, K, D]: the class means of those heads over the
    whole training set (these examples included); counts [C]: examples per class.

    For each example, each head votes for its nearest centroid, its own class's without the
    example; the vote of the first k heads is scored for each k; the mean similarity of the
    first k heads gives the probabilities at each temperature."""
    vectors_k = np.asarray(vectors_k)
    n, big_k, _ = vectors_k.shape
    ks_arr = np.asarray(sorted(ks), dtype=np.int64)
    if big_k != ks_arr[-1] or centroids.shape[1] != big_k:
        raise ReduceError(f"loo_curve needs the top {ks_arr[-1]} heads; got {big_k}")
    y = np.asarray(label_idx, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.float64)
    means = np.asarray(centroids, dtype=np.float64)  # [C, K, D]
    unit_means = _unit(means)
    num_classes = len(means)
    correct = np.zeros(len(ks_arr), dtype=np.int64)
    loss = np.zeros((len(ks_arr), len(temperatures)), dtype=np.float64)
    step = max(1, _CHUNK_FLOATS // (big_k * num_classes))
    for start in range(0, n, step):
        x = np.asarray(vectors_k[start : start + step], dtype=np.float64)  # [b, K, D]
        yb = y[start : start + step]
        rows = np.arange(len(yb))
        sims = _loo_similarities(x, yb, means, unit_means, counts)  # [b, K, C]
        nearest = sims.argmax(axis=-1)  # [b, K]; first maximum = lowest class index
        mean_sims = np.cumsum(sims, axis=1)[:, ks_arr - 1, :] / ks_arr[None, :, None]  # [b, g, C]
        for g, k in enumerate(ks_arr):
            correct[g] += int((vote(nearest[:, :k], num_classes).label_idx == yb).sum())
            for t, temperature in enumerate(temperatures):
                z = mean_sims[:, g, :] / temperature  # [b, C]
                top = z.max(axis=1)
                log_norm = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
                loss[g, t] += float((log_norm - z[rows, yb]).sum())
    return LooCurve(ks_arr, np.asarray(temperatures), correct, loss, n)


def loo_probabilities(
    vectors_k: np.ndarray,
    label_idx: np.ndarray,
    centroids: np.ndarray,
    counts: np.ndarray,
    temperature: float,
) -> np.ndarray:
    """Leave-one-out probabilities [n, C] of training examples: vectors_k [n, k, D] of the
    selected heads, centroids [C, k, D] over the whole training set, counts [C]."""
    means = np.asarray(centroids, dtype=np.float64)
    sims = _loo_similarities(
        np.asarray(vectors_k, dtype=np.float64),
        np.asarray(label_idx, dtype=np.int64),
        means,
        _unit(means),
        np.asarray(counts, dtype=np.float64),
    )  # [n, k, C]
    return softmax(sims.mean(axis=1) / temperature)


# --- thresholds and calibration metrics --------------------------------------------------------


@dataclass(frozen=True)
class Threshold:
    """Call an input positive when p(positive_label) >= threshold."""

    positive_label: str
    threshold: float
    target: str  # "precision" | "recall"
    target_value: float
    precision: float  # on the data it was chosen on
    recall: float

    def to_dict(self) -> dict[str, object]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Threshold:
        return cls(**d)


def _operating_points(
    scores: np.ndarray, positive: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each distinct score t, highest first: (t, rows with score >= t, positives among
    them), [m] each; calling `scores >= t` positive gives precision tp / called."""
    thresholds, which = np.unique(scores, return_inverse=True)  # ascending
    rows = np.bincount(which, minlength=len(thresholds))
    hits = np.bincount(which[positive], minlength=len(thresholds))
    return thresholds[::-1], np.cumsum(rows[::-1]), np.cumsum(hits[::-1])


def choose_threshold(
    scores: np.ndarray, positive: np.ndarray, target: str, value: float
) -> tuple[float, float, float]:
    """(threshold, precision, recall) for calling `scores >= threshold` positive: for a target
    precision, the lowest threshold whose precision reaches it (the most recall); for a target
    recall, the highest threshold whose recall reaches it (the most precision). Raises when no
    threshold reaches the target."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    if not positive.any():
        raise ReduceError("no positive examples: a threshold cannot be chosen")
    thresholds, called, tp = _operating_points(scores, positive)  # highest threshold first
    precision, recall = tp / called, tp / int(positive.sum())
    reached = np.flatnonzero((precision if target == "precision" else recall) >= value)
    if not len(reached):
        raise ReduceError(
            f"no threshold reaches {target} {value:g} on these scores; lower the target"
        )
    i = reached[-1] if target == "precision" else reached[0]
    return float(thresholds[i]), float(precision[i]), float(recall[i])


def reliability_bins(
    confidence: np.ndarray, correct: np.ndarray, bins: int = 10
) -> list[tuple[float, float, float]]:
    """(share of rows, mean confidence, accuracy) of each non-empty equal-width confidence bin,
    in order. Bins are (i/bins, (i+1)/bins], the first one also holding 0."""
    confidence = np.asarray(confidence, dtype=np.float64)  # [n]
    correct = np.asarray(correct, dtype=np.float64)  # [n]
    if confidence.shape != correct.shape or confidence.size == 0:
        raise ValueError(f"need equal non-empty shapes, got {confidence.shape}, {correct.shape}")
    if confidence.min() < 0 or confidence.max() > 1:
        raise ValueError("confidences must be in [0, 1]")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges[1:-1], confidence, side="left")  # [n] bin index
    out = []
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            out.append((float(in_bin.mean()), confidence[in_bin].mean(), correct[in_bin].mean()))
    return out


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = 10
) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| x share of rows
    (`reliability_bins`)."""
    ece = 0.0
    for share, mean_confidence, accuracy in reliability_bins(confidence, correct, bins):
        ece += share * abs(accuracy - mean_confidence)
    return float(ece)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative
    (ties count half)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    ranks[order] = _average_ranks(values)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _average_ranks(sorted_values: np.ndarray) -> np.ndarray:
    ranks = np.arange(1, len(sorted_values) + 1, dtype=np.float64)
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        ranks[start : start + count] = ranks[start : start + count].mean()
    return ranks


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """PR-AUC as average precision: the mean precision at each positive's score."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    if not positive.any():
        return float("nan")
    _, called, tp = _operating_points(scores, positive)
    hits = np.diff(tp, prepend=0)  # positives scoring exactly each threshold
    return float((hits * tp / called).sum() / positive.sum())
