"""Tests for sav_ray.core.reduce: class sums, head scoring, ranking and voting against plain loops."""

import itertools
from collections import Counter
from functools import reduce

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sav_ray.core.reduce import (
    SELECTION_METHODS,
    ClassSums,
    HeadHits,
    ReduceError,
    accuracy,
    classify,
    gather_heads,
    head_hits,
    nearest_centroid,
    rank_heads,
    select_heads,
    vote,
)

LABELS = ("bird", "cat", "dog")


def random_data(seed, n=30, shape=(3, 4, 8), num_classes=3):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, *shape))  # [n, layer, head, head_dim]
    # every class gets at least 2 examples so loo is defined
    label_idx = np.concatenate(
        [np.repeat(np.arange(num_classes), 2), rng.integers(0, num_classes, n - 2 * num_classes)]
    )
    rng.shuffle(label_idx)
    return vectors, label_idx


def cosine(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def loop_head_hits(vectors, label_idx, num_classes, method):
    """Reference: per example, per head, nearest mean centroid by cosine, ties to the lowest class."""
    n, num_layers, num_heads, _ = vectors.shape
    hits = np.zeros((num_layers, num_heads), dtype=np.int64)
    for i in range(n):
        for layer in range(num_layers):
            for head in range(num_heads):
                best, best_sim = None, -np.inf
                for c in range(num_classes):
                    members = [j for j in range(n) if label_idx[j] == c]
                    if method == "loo" and c == label_idx[i]:
                        members.remove(i)
                    centroid = vectors[members, layer, head].mean(axis=0)
                    sim = cosine(vectors[i, layer, head], centroid)
                    if sim > best_sim:
                        best, best_sim = c, sim
                hits[layer, head] += best == label_idx[i]
    return hits


@pytest.mark.parametrize("method", SELECTION_METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_head_hits_match_loop_one_shot_chunked_and_merged(method, seed):
    vectors, label_idx = random_data(seed)
    sums = ClassSums.from_batch(LABELS, vectors, label_idx)
    expected = loop_head_hits(vectors, label_idx, len(LABELS), method)

    one_shot = head_hits(vectors, label_idx, sums, method)
    np.testing.assert_array_equal(one_shot.hits, expected)
    assert one_shot.n == len(vectors)

    internally_chunked = head_hits(vectors, label_idx, sums, method, chunk_size=7)
    np.testing.assert_array_equal(internally_chunked.hits, expected)

    bounds = [0, 4, 5, 17, 30]
    parts = [
        head_hits(vectors[a:b], label_idx[a:b], sums, method) for a, b in itertools.pairwise(bounds)
    ]
    merged = reduce(HeadHits.merge, parts[::-1], HeadHits.zeros((3, 4)))
    np.testing.assert_array_equal(merged.hits, expected)
    np.testing.assert_array_equal(merged.scores(), expected / len(vectors))


def test_loo_differs_from_paper_on_some_head():
    # small classes make leaving one out matter; guards against loo silently equal to paper
    vectors, label_idx = random_data(3, n=9)
    sums = ClassSums.from_batch(LABELS, vectors, label_idx)
    paper = head_hits(vectors, label_idx, sums, "paper").hits
    loo = head_hits(vectors, label_idx, sums, "loo").hits
    assert (loo <= paper).all() and (loo < paper).any()


def test_class_sums_merge_in_any_order_equals_one_shot_and_mean():
    vectors, label_idx = random_data(4, n=40)
    one_shot = ClassSums.from_batch(LABELS, vectors, label_idx)
    bounds = [0, 3, 11, 12, 25, 40]
    parts = [
        ClassSums.from_batch(LABELS, vectors[a:b], label_idx[a:b])
        for a, b in itertools.pairwise(bounds)
    ]
    merged_variants = [reduce(ClassSums.merge, perm) for perm in itertools.permutations(parts)]
    # tree merges
    merged_variants.append(parts[0].merge(parts[1]).merge(parts[2].merge(parts[3].merge(parts[4]))))
    merged_variants.append(
        (parts[4].merge(parts[2])).merge(parts[0]).merge(parts[3].merge(parts[1]))
    )
    merged_variants.append(reduce(ClassSums.merge, parts, ClassSums.zeros(LABELS, (3, 4, 8))))
    for merged in merged_variants:
        assert merged.labels == LABELS
        np.testing.assert_allclose(merged.sums, one_shot.sums, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(merged.counts, one_shot.counts)

    centroids = one_shot.centroids()
    assert centroids.dtype == np.float32 and centroids.shape == (3, 3, 4, 8)
    for c in range(len(LABELS)):
        np.testing.assert_allclose(centroids[c], vectors[label_idx == c].mean(axis=0), atol=1e-6)
    np.testing.assert_array_equal(one_shot.counts, np.bincount(label_idx, minlength=3))


def test_class_sums_merge_refuses_different_labels_or_shapes():
    vectors, label_idx = random_data(5)
    a = ClassSums.from_batch(LABELS, vectors, label_idx)
    with pytest.raises(ReduceError, match="different labels"):
        a.merge(ClassSums.from_batch(("a", "b", "c"), vectors, label_idx))
    with pytest.raises(ReduceError, match="shape"):
        a.merge(ClassSums.from_batch(LABELS, vectors[:, :2], label_idx))


def test_from_batch_rejects_bad_label_idx():
    vectors, _ = random_data(6, n=6)
    with pytest.raises(ReduceError, match=r"\[0, 3\)"):
        ClassSums.from_batch(LABELS, vectors, np.array([0, 1, 2, 3, 0, 1]))
    with pytest.raises(ReduceError, match="integer"):
        ClassSums.from_batch(LABELS, vectors, np.zeros(6))


def test_float16_vectors_are_summed_in_float64():
    # 60000 is near float16's max (65504): a float16 accumulator would overflow to inf
    vectors = np.full((4, 2, 2, 3), 60000, dtype=np.float16)
    label_idx = np.array([0, 0, 1, 1])
    sums = ClassSums.from_batch(("a", "b"), vectors, label_idx)
    assert sums.sums.dtype == np.float64
    np.testing.assert_array_equal(sums.sums, np.full((2, 2, 2, 3), 120000.0))
    np.testing.assert_array_equal(sums.centroids(), np.full((2, 2, 2, 3), 60000.0))

    v16, label_idx = random_data(7)
    v16 = v16.astype(np.float16)
    sums16 = ClassSums.from_batch(LABELS, v16, label_idx)
    sums64 = ClassSums.from_batch(LABELS, v16.astype(np.float64), label_idx)
    np.testing.assert_array_equal(sums16.sums, sums64.sums)
    for method in SELECTION_METHODS:
        np.testing.assert_array_equal(
            head_hits(v16, label_idx, sums16, method).hits,
            loop_head_hits(v16.astype(np.float64), label_idx, 3, method),
        )


def test_zero_vectors_give_no_nan_and_lowest_class():
    vectors, label_idx = random_data(8)
    vectors[0] = 0.0
    vectors[label_idx == 1, 0, 0] = 0.0  # class 1 centroid is zero at head (0, 0)
    sums = ClassSums.from_batch(LABELS, vectors, label_idx)
    for method in SELECTION_METHODS:
        np.testing.assert_array_equal(
            head_hits(vectors, label_idx, sums, method).hits,
            loop_head_hits(vectors, label_idx, 3, method),
        )
    nearest = nearest_centroid(np.zeros((1, 2, 4)), np.ones((3, 2, 4)))
    np.testing.assert_array_equal(nearest, [[0, 0]])


def test_loo_needs_two_examples_per_class_and_centroids_need_one():
    vectors = np.random.default_rng(9).normal(size=(5, 3, 4, 8))
    label_idx = np.array([0, 1, 1, 2, 2])
    sums = ClassSums.from_batch(LABELS, vectors, label_idx)
    with pytest.raises(
        ReduceError, match="class 'bird' has 1 example; loo selection needs at least 2"
    ):
        head_hits(vectors, label_idx, sums, "loo")
    assert head_hits(vectors, label_idx, sums, "paper").n == 5

    empty = ClassSums.from_batch(LABELS, vectors[1:3], label_idx[1:3])
    with pytest.raises(ReduceError, match="class 'bird' has 0 examples"):
        empty.centroids()
    with pytest.raises(ReduceError, match="class 'bird' has 0 examples"):
        head_hits(vectors[1:3], label_idx[1:3], empty, "paper")


def test_head_hits_rejects_unknown_method_and_wrong_shape():
    vectors, label_idx = random_data(10)
    sums = ClassSums.from_batch(LABELS, vectors, label_idx)
    with pytest.raises(ReduceError, match="paper"):
        head_hits(vectors, label_idx, sums, "oracle")
    with pytest.raises(ReduceError, match=r"\[n, 3, 4, 8\]"):
        head_hits(vectors[:, :, :2], label_idx, sums, "paper")
    with pytest.raises(ReduceError, match="no examples"):
        HeadHits.zeros((3, 4)).scores()


def test_rank_heads_ties_go_to_lower_layer_head():
    scores = np.array(
        [
            [0.5, 0.9, 0.1],
            [0.9, 0.5, 0.9],
        ]
    )
    ranked = rank_heads(scores)
    assert ranked.dtype == np.int64
    assert ranked.tolist() == [[0, 1], [1, 0], [1, 2], [0, 0], [1, 1], [0, 2]]
    assert select_heads(scores, 2).tolist() == [[0, 1], [1, 0]]


def test_rank_heads_matches_sorted_on_random_scores_with_ties():
    rng = np.random.default_rng(11)
    scores = rng.integers(0, 5, size=(6, 7)) / 4  # few distinct values: many ties
    expected = sorted(np.ndindex(*scores.shape), key=lambda lh: (-scores[lh], lh))
    assert [tuple(x) for x in rank_heads(scores).tolist()] == expected


@pytest.mark.parametrize("k", [0, -1, 7])
def test_select_heads_k_bounds(k):
    with pytest.raises(ReduceError, match=r"--num-heads must be between 1 and 6"):
        select_heads(np.zeros((2, 3)), k)


def test_gather_heads_picks_layer_head_pairs_in_order():
    x = np.arange(2 * 5 * 3 * 4 * 2).reshape(2, 5, 3, 4, 2)  # [batch, row, layer, head, head_dim]
    heads = np.array([[2, 1], [0, 3], [2, 1]])
    out = gather_heads(x, heads)
    assert out.shape == (2, 5, 3, 2)
    for j, (layer, head) in enumerate(heads):
        np.testing.assert_array_equal(out[..., j, :], x[..., layer, head, :])
    with pytest.raises(ReduceError, match=r"\[\[3, 0\]\]"):
        gather_heads(x, np.array([[3, 0]]))


def test_nearest_centroid_matches_loop():
    rng = np.random.default_rng(12)
    vectors = rng.normal(size=(10, 5, 6))  # [n, k, head_dim]
    centroids = rng.normal(size=(4, 5, 6)).astype(np.float32)  # [class, k, head_dim]
    expected = [
        [
            int(np.argmax([cosine(vectors[i, j], centroids[c, j]) for c in range(4)]))
            for j in range(5)
        ]
        for i in range(10)
    ]
    np.testing.assert_array_equal(nearest_centroid(vectors, centroids), expected)


@pytest.mark.parametrize(
    ("row", "winner"),
    [
        ([1, 0, 0, 1], 1),  # 2-2 tie: head 0 voted 1
        ([0, 1, 1, 0], 0),
        ([2, 0, 1, 0, 2], 2),  # 0 and 2 tie on 2; head 0 voted 2
        ([1, 0, 2, 2, 0], 0),  # 0 and 2 tie; head 0 voted 1 (not tied), head 1 voted 0
        ([1, 2, 2], 2),  # clear majority beats the top head
    ],
)
def test_vote_tie_goes_to_highest_ranked_head_like_counter(row, winner):
    assert Counter(row).most_common(1)[0][0] == winner
    result = vote(np.array([row]), 3)
    assert result.label_idx.tolist() == [winner]
    assert result.votes.tolist() == [[row.count(c) for c in range(3)]]


@st.composite
def vote_matrices(draw):
    num_classes = draw(st.integers(1, 5))
    n, k = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    cell = st.integers(0, num_classes - 1)
    rows = draw(st.lists(st.lists(cell, min_size=k, max_size=k), min_size=n, max_size=n))
    return num_classes, rows


@settings(max_examples=200, deadline=None)
@given(vote_matrices())
def test_vote_matches_counter_most_common(case):
    num_classes, rows = case
    result = vote(np.array(rows), num_classes)
    assert result.label_idx.tolist() == [Counter(r).most_common(1)[0][0] for r in rows]
    np.testing.assert_allclose(result.scores.sum(axis=1), 1.0)
    np.testing.assert_array_equal(result.scores, result.votes / len(rows[0]))


def test_classify_scores_sum_to_one_and_recover_clean_classes():
    rng = np.random.default_rng(13)
    centroids = rng.normal(size=(3, 5, 8)).astype(np.float32)  # [class, k, head_dim]
    label_idx = rng.integers(0, 3, size=20)
    vectors = centroids[label_idx] + 0.01 * rng.normal(size=(20, 5, 8))  # [n, k, head_dim]
    result = classify(vectors, centroids)
    assert result.scores.dtype == np.float64 and result.scores.shape == (20, 3)
    np.testing.assert_allclose(result.scores.sum(axis=1), 1.0)
    np.testing.assert_array_equal(result.label_idx, label_idx)
    assert accuracy(result.label_idx, label_idx) == 1.0
    assert accuracy(np.array([0, 1]), np.array([0, 0])) == 0.5


def test_vote_rejects_out_of_range_classes():
    with pytest.raises(ReduceError, match=r"\[0, 2\)"):
        vote(np.array([[0, 2]]), 2)
