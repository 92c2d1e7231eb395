"""sav_ray.bench.scale at a tiny size: the generated cases and the reducer path they run."""

from __future__ import annotations

import numpy as np
import pytest

from sav_ray.bench.scale import ScaleCase, _block_labels, run_case

pytestmark = pytest.mark.slow


def test_cases_of_the_same_size_have_every_class_shots_times():
    many, few = ScaleCase(100, 4, block_rows=50), ScaleCase(10, 40, block_rows=50)
    for case in (many, few):
        y = np.concatenate([_block_labels(case, a, a + 50) for a in range(0, 400, 50)])
        np.testing.assert_array_equal(np.bincount(y, minlength=case.classes), case.shots)
        assert len(np.unique(y[:50])) > 1  # shuffled: a block holds several classes


def test_run_case_reduces_every_generated_example(local_ray):
    case = ScaleCase(20, 5, shape=(2, 3, 8), block_rows=30, num_heads=4)
    got = run_case(case)
    assert got["class_sums_mib"] * 2**20 == 20 * 2 * 3 * 8 * 8  # float64 [class, l, h, d]
    assert got["peak_rss_mib"] >= got["baseline_rss_mib"] > 0
    assert got["seconds"] >= got["first_pass_seconds"] > 0
