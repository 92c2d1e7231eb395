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
