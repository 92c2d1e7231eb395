"""Shared fixtures: tiny random models built offline once per session, a local Ray."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# head_dim differs from hidden/heads (64/4 = 16) where the architecture allows it
HEAD_DIM = {"llava": 32, "gemma3": 32}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """arch -> folder of a saved tiny model (built once per session)."""
    from sav_ray.tiny import build_tiny_model

    built: dict[str, object] = {}

    def get(arch: str):
        if arch not in built:
            out = tmp_path_factory.mktemp(f"tiny_{arch}")
            built[arch] = build_tiny_model(arch, out, head_dim=HEAD_DIM.get(arch))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """arch -> LoadedModel of a tiny model, loaded through the real loader (cached)."""
    from sav_ray.models import load_model

    loaded: dict[str, object] = {}

    def get(arch: str):
        if arch not in loaded:
            loaded[arch] = load_model(str(tiny_model_dir(arch)))
        return loaded[arch]

    return get


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """The demo model (sav_ray.tiny.DEMO_MODEL): 48 heads."""
    from sav_ray.tiny import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo_model"))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """{"train": manifest, "test": manifest}: 3 classes, 20 train and 10 test images each."""
    from sav_ray.demo_data import make_dataset

    return make_dataset(tmp_path_factory.mktemp("demo_data"))


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the module (2 CPUs, no dashboard), shut down afterwards."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
