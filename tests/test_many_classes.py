"""Many classes: a block's partial is sized by the classes in it, and the Ray reducer path
(`first_pass`, `head_hits`) gives the same sums and head scores as the in-process reducer."""

from __future__ import annotations

import numpy as np
import pytest

from sav_ray.core import reduce
from sav_ray.pipelines.fitting import _sums_of_block, first_pass, head_hits

SHAPE = (3, 4, 8)  # [layer, head, head_dim]


def block(rows: int, classes: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "vectors": rng.standard_normal((rows, *SHAPE)).astype(np.float16),
        "label": np.array([classes[i % len(classes)] for i in range(rows)], dtype=object),
    }


def nbytes(partial: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in partial.values())


def test_partial_size_depends_only_on_the_classes_in_the_block():
    rows = block(12, ["c3", "c7", "c9"])
    few = tuple(f"c{i}" for i in range(10))
    many = tuple(f"c{i}" for i in range(1000))
    assert nbytes(_sums_of_block(rows, few)) == nbytes(_sums_of_block(rows, many))
    # ... and grows with them: six classes in the same rows take more than three
    six = nbytes(_sums_of_block(block(12, ["c1", "c2", "c3", "c4", "c5", "c6"]), many))
    assert six > nbytes(_sums_of_block(rows, many))


def test_partials_of_present_classes_add_up_to_the_dense_sums():
    rng = np.random.default_rng(1)
    labels = tuple(f"c{i}" for i in range(7))
    x = rng.standard_normal((40, *SHAPE))  # [n, layer, head, head_dim]
    y = rng.integers(0, 7, 40)  # [n]
    dense = reduce.ClassSums.from_batch(labels, x, y)
    starts = range(0, 40, 9)
    parts = [
        reduce.ClassSums.from_batch(labels, x[a : a + 9], y[a : a + 9], present_only=True)
        for a in starts
    ]
    assert [len(p.sums) for p in parts] == [len(np.unique(y[a : a + 9])) for a in starts]
    total = reduce.ClassSums.zeros(labels, SHAPE)
    for p in parts:
        total.add(p)
    np.testing.assert_allclose(total.sums, dense.sums, atol=1e-12, rtol=0)
    np.testing.assert_array_equal(total.counts, dense.counts)
    merged = parts[0].merge(parts[1])  # two partials: the union of their classes
    np.testing.assert_array_equal(merged.present, np.union1d(parts[0].present, parts[1].present))
    with pytest.raises(reduce.ReduceError, match="row per label"):
        parts[0].centroids()
    heads = np.array([[2, 1], [0, 3]])  # [k, 2] (layer, head)
    np.testing.assert_array_equal(
        dense.centroids(heads), reduce.gather_heads(dense.centroids(), heads)
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["paper", "loo"])
def test_ray_reducer_matches_the_in_process_reducer(local_ray, method):
    rng = np.random.default_rng(2)
    labels = tuple(f"class{i}" for i in range(30))
    y = np.concatenate([np.repeat(np.arange(30), 2), rng.integers(0, 30, 60)])  # [n]
    rng.shuffle(y)
    means = 2 * rng.standard_normal((30, *SHAPE))
    x = (means[y] + rng.standard_normal((len(y), *SHAPE))).astype(np.float16)  # [n, ...]
    items = [{"vectors": v, "label": labels[c]} for v, c in zip(x, y, strict=True)]
    ds = local_ray.data.from_items(items, override_num_blocks=6).materialize()

    first = first_pass(ds, labels)
    sums, forward_rows, info = first.sums, first.forward_rows, first.info  # sums: a Ray actor's
    expected = reduce.ClassSums.from_batch(labels, x, y)
    np.testing.assert_array_equal(sums.counts, expected.counts)
    assert sums.shape == SHAPE
    # float16 vectors add up exactly in float64 whatever the order of the blocks
    np.testing.assert_array_equal(sums.centroids(), expected.centroids())
    heads = np.array([[2, 3], [0, 0], [1, 2]])  # [k, 2] (layer, head)
    np.testing.assert_array_equal(sums.centroids(heads), expected.centroids(heads))
    assert forward_rows == 0 and info is None  # saved vectors: no model ran

    hits = head_hits(ds, sums, method)
    assert hits.n == len(y)
    np.testing.assert_array_equal(hits.hits, reduce.head_hits(x, y, expected, method).hits)
