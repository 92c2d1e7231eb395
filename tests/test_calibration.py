"""Probabilities, the temperature, k from the data and thresholds (sav_ray/core/calibration.py), on
generated vectors with a known class structure, against plain loops."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from sav_ray.core import calibration, reduce


def generated(n_per_class, classes=3, heads=(4, 8), dim=16, signal=(), strength=1.0, seed=0):
    """Vectors [n, layer, head, dim] and labels: heads in `signal` carry a class mean (plus
    noise), every other head noise only."""
    rng = np.random.default_rng(seed)
    layers, per_layer = heads
    means = rng.standard_normal((classes, layers, per_layer, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    x = rng.standard_normal((len(y), layers, per_layer, dim))
    for layer, head in signal:
        x[:, layer, head] += strength * means[y, layer, head]
    return x, y


def fitted(x, y, classes):
    """Class sums, head scores and rank of generated vectors, as the fit computes them."""
    sums = reduce.ClassSums.from_batch([str(c) for c in range(classes)], x, y)
    scores = reduce.head_hits(x, y, sums, "paper").scores()
    return sums, reduce.rank_heads(scores)


def plain_loo(x, y, heads, counts, sums_k):
    """Leave-one-out by recomputing each example's own centroid without it: per example, the
    class each head picks and the similarity to every class, [n, K], [n, K, C]."""
    n, k = len(y), len(heads)
    picks, sims = np.zeros((n, k), dtype=int), np.zeros((n, k, len(counts)))
    for i in range(n):
        for h, (layer, head) in enumerate(heads):
            v = x[i, layer, head]
            for c in range(len(counts)):
                centroid = sums_k[c, h] - (v if c == y[i] else 0)
                denom = np.linalg.norm(v) * np.linalg.norm(centroid)
                sims[i, h, c] = v @ centroid / denom if denom > 0 else 0.0
            picks[i, h] = int(np.argmax(sims[i, h]))
    return picks, sims


def test_the_leave_one_out_curve_equals_a_plain_loop_over_k():
    x, y = generated(6, signal=[(0, 1), (2, 3), (1, 5)], strength=0.8)
    sums, ranked = fitted(x, y, 3)
    ks = calibration.k_grid(32)
    top = ranked[: ks[-1]]
    centroids = sums.centroids(top)  # [C, K, D]
    temps = np.array([0.05, 0.2, 1.0])
    curve = calibration.loo_curve(reduce.gather_heads(x, top), y, centroids, sums.counts, ks, temps)
    picks, sims = plain_loo(x, y, top, sums.counts, reduce.gather_heads(sums.sums, top))
    for g, k in enumerate(ks):
        wins = [Counter(row[:k].tolist()).most_common(1)[0][0] for row in picks]
        assert curve.correct[g] == sum(int(w == t) for w, t in zip(wins, y, strict=True)), k
        for t, temperature in enumerate(temps):
            z = sims[:, :k].mean(axis=1) / temperature
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            assert curve.log_loss[g, t] == pytest.approx(-logp[np.arange(len(y)), y].sum())
    # merged partials equal one pass over everything
    halves = [
        calibration.loo_curve(
            reduce.gather_heads(x[part], top), y[part], centroids, sums.counts, ks, temps
        )
        for part in (slice(0, 7), slice(7, None))
    ]
    merged = halves[0].merge(halves[1])
    np.testing.assert_array_equal(merged.correct, curve.correct)
    np.testing.assert_allclose(merged.log_loss, curve.log_loss)


@pytest.mark.parametrize("m", [3, 10])
def test_auto_k_is_near_the_number_of_heads_that_carry_the_signal(m):
    rng = np.random.default_rng(m)
    signal = [tuple(int(v) for v in divmod(i, 8)) for i in rng.choice(32, m, replace=False)]
    x, y = generated(20, signal=signal, strength=0.35, seed=m)
    sums, ranked = fitted(x, y, 3)
    ks = calibration.k_grid(32)
    top = ranked[: ks[-1]]
    curve = calibration.loo_curve(
        reduce.gather_heads(x, top), y, sums.centroids(top), sums.counts, ks
    )
    chosen = ks[curve.choose()]
    assert m / 2 <= chosen <= 2 * m, (chosen, curve.accuracy())


def test_probabilities_sum_to_one_and_are_the_softmax_of_mean_cosines():
    x, y = generated(5, signal=[(0, 0), (1, 1)])
    vectors_k = x[:, [0, 1], [0, 1]]  # [n, 2, D]
    centroids = np.stack([vectors_k[y == c].mean(axis=0) for c in range(3)])  # [C, 2, D]
    p = calibration.probabilities(vectors_k, centroids, 0.1)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    for i in range(len(y)):
        s = [
            np.mean(
                [
                    vectors_k[i, h]
                    @ centroids[c, h]
                    / np.linalg.norm(vectors_k[i, h])
                    / np.linalg.norm(centroids[c, h])
                    for h in range(2)
                ]
            )
            for c in range(3)
        ]
        e = np.exp(np.array(s) / 0.1)
        np.testing.assert_allclose(p[i], e / e.sum(), rtol=1e-9)


def test_probabilities_are_better_calibrated_than_vote_shares_on_held_out_vectors():
    """Heads that each carry a weak signal: a vote of 10 is often unanimous and wrong, the
    fitted probabilities hedge; their ECE on new vectors is lower."""
    signal = [(layer, head) for layer in range(2) for head in range(5)]
    all_x, all_y = generated(80, signal=signal, strength=0.3, seed=1)
    train = np.arange(len(all_y)) % 2 == 0
    x, y, test_x, test_y = all_x[train], all_y[train], all_x[~train], all_y[~train]
    sums, ranked = fitted(x, y, 3)
    top = ranked[:10]
    centroids = sums.centroids(top)
    curve = calibration.loo_curve(reduce.gather_heads(x, top), y, centroids, sums.counts, [10])
    temperature = curve.temperature(0)
    vectors = reduce.gather_heads(test_x, top)
    p = calibration.probabilities(vectors, centroids, temperature)
    votes = reduce.classify(vectors, centroids)
    ece_p = calibration.expected_calibration_error(p.max(axis=1), p.argmax(axis=1) == test_y)
    ece_v = calibration.expected_calibration_error(
        votes.scores.max(axis=1), votes.label_idx == test_y
    )
    print(f"ECE probabilities {ece_p:.3f}, vote shares {ece_v:.3f}")
    assert ece_p < ece_v, (ece_p, ece_v)


def test_a_threshold_reaches_the_target_precision_with_the_most_recall():
    rng = np.random.default_rng(0)
    positive = rng.random(200) < 0.4
    scores = np.clip(0.5 + 0.25 * (positive - 0.5) + 0.2 * rng.standard_normal(200), 0, 1)
    t, precision, recall = calibration.choose_threshold(scores, positive, "precision", 0.9)
    called = scores >= t
    assert precision == (called & positive).sum() / called.sum() >= 0.9
    assert recall == (called & positive).sum() / positive.sum()
    lower = scores[scores < t].max()  # the next threshold down misses the target
    below = scores >= lower
    assert (below & positive).sum() / below.sum() < 0.9
    t, _, recall = calibration.choose_threshold(scores, positive, "recall", 0.8)
    assert recall >= 0.8 and ((scores >= t) & positive).sum() / positive.sum() == recall
    with pytest.raises(ValueError, match="no threshold reaches precision 1"):
        calibration.choose_threshold(np.array([0.5, 0.5]), np.array([True, False]), "precision", 1)


def test_roc_auc_and_average_precision_equal_their_definitions():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 10, 60) / 10  # ties on purpose
    positive = rng.random(60) < 0.5
    pos, neg = scores[positive], scores[~positive]
    pairs = [(a > b) + 0.5 * (a == b) for a in pos for b in neg]
    assert calibration.roc_auc(scores, positive) == pytest.approx(np.mean(pairs))
    precisions = [((scores >= s) & positive).sum() / (scores >= s).sum() for s in scores[positive]]
    assert calibration.average_precision(scores, positive) == pytest.approx(np.mean(precisions))


def test_decision_probability_labels_by_the_most_probable_class_and_needs_a_calibration(
    tmp_path,
):
    """Two heads lean slightly to `a`, one strongly to `b`: the vote says a, the mean
    similarity (hence the probabilities) says b."""
    from dataclasses import replace

    from sav_ray.core.artifact import (
        ArtifactError,
        BaseModelInfo,
        Calibration,
        SavArtifact,
        Selection,
        load_artifact,
        write_artifact,
    )
    from sav_ray.core.classify import predictions
    from sav_ray.core.prompts import PromptConfig

    centroids = np.array(
        [
            [[1.0, 0.01], [1.0, 0.01], [-1.0, 0.0]],  # a
            [[1.0, -0.02], [1.0, -0.02], [1.0, 0.0]],  # b
        ],
        dtype=np.float32,
    )  # [class, k, head_dim]
    info = BaseModelInfo("m", None, "X", 2, 2, 2, "float32")
    artifact = SavArtifact(
        labels=["a", "b"],
        heads=np.array([[0, 0], [0, 1], [1, 0]]),
        centroids=centroids,
        base_model=info,
        prompt=PromptConfig(),
        selection=Selection("paper", 3, {"a": 1, "b": 1}, [1.0, 1.0, 1.0]),
        calibration=Calibration(temperature=0.1, loo_log_loss=0.5, loo_accuracy=1.0),
    )
    x = np.array([[[1.0, 0.0]] * 3])  # [1, k, head_dim]
    [by_vote] = predictions(artifact, x)
    assert by_vote.label == "a" and by_vote.votes == {"a": 2, "b": 1}
    assert by_vote.probabilities["b"] > by_vote.probabilities["a"]
    [by_p] = predictions(replace(artifact, decision="probability"), x)
    assert by_p.label == "b" and by_p.votes == by_vote.votes
    write_artifact(replace(artifact, decision="probability"), tmp_path / "p")
    loaded = load_artifact(tmp_path / "p")
    assert loaded.decision == "probability" and loaded.calibration == artifact.calibration
    with pytest.raises(ArtifactError, match="decision 'probability' needs a calibration"):
        write_artifact(replace(artifact, decision="probability", calibration=None), tmp_path / "q")
    assert not (tmp_path / "q").exists()
