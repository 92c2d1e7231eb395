"""A model actor killed in the middle of a fit: Ray restarts it and retries its batches, and
the fit ends with the same artifact as an undisturbed run."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from sav_ray.pipelines.config import FitConfig
from sav_ray.pipelines.fitting import fit

pytestmark = pytest.mark.slow


def extract_actor_pids() -> set[int]:
    """Model actors of this test's own local Ray (its processes descend from this one)."""
    import psutil

    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if "ExtractVectors" in " ".join(proc.cmdline()):
                pids.add(proc.pid)
        except psutil.Error:
            pass
    return pids


def test_killed_actor_gives_the_undisturbed_artifact(
    local_ray, demo_model_dir, big_manifest, tmp_path
):
    cfg = FitConfig(
        model=str(demo_model_dir),
        train=str(big_manifest),
        output=str(tmp_path / "sav"),
        batch_size=4,
        id_field="id",
    )
    undisturbed, _ = fit(cfg)

    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(zip(("art", "stats"), fit(cfg), strict=True))
    )
    worker.start()
    deadline = time.monotonic() + 120
    pids: set[int] = set()
    while not pids and time.monotonic() < deadline:
        pids = extract_actor_pids()
        time.sleep(0.05)
    assert pids, "no model actor came up"
    time.sleep(1.0)  # let it load the model and get through some batches
    victim = pids.pop()
    os.kill(victim, signal.SIGKILL)
    replacements: set[int] = set()
    while worker.is_alive() and time.monotonic() < deadline + 180:
        replacements |= extract_actor_pids() - {victim}
        time.sleep(0.05)
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert replacements, "the killed actor was not replaced: the kill came too late to matter"
    disturbed, stats = result["art"], result["stats"]
    assert stats.examples == 300
    np.testing.assert_array_equal(disturbed.heads, undisturbed.heads)
    np.testing.assert_allclose(disturbed.centroids, undisturbed.centroids, atol=1e-5, rtol=0)
    assert disturbed.labels == undisturbed.labels
