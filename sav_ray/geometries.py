"""The architecture of real checkpoints, and random models built at their width.

A `Geometry` holds what a checkpoint's `config.json` on the Hugging Face hub says about its
decoder (width, heads, key/value heads, head_dim, MLP width, depth, rotary settings, vocabulary)
and its vision tower. `build_geometry_model` builds a random model with the real decoder width,
heads and head_dim, `layers` decoder layers, and `sav_ray.tiny`'s small vision tower, small
vocabulary, tokenizer, processor and chat template, so capture, fit and predict run at the real
per-head geometry (e.g. 28 x 28 heads of 128 for Qwen2-VL-7B) without the weights:

    python -c "from sav_ray.geometries import build_geometry_model as b; b('qwen2-vl-7b', '/tmp/g')"

With `intermediate_size=None` each layer has the real MLP (Qwen2-7B: 233M parameters per layer,
0.47 GB in bfloat16); tests pass a small one to keep the folder small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sav_ray.errors import ConfigError
from sav_ray.tiny import build_tiny_model


@dataclass(frozen=True)
class Geometry:
    checkpoint: str  # hub id whose config.json the values come from
    arch: str  # the sav_ray.tiny architecture that builds it
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_parameters: dict[str, Any]  # transformers 5 layout (its `rope_scaling` folded in)
    vision: dict[str, Any]  # the real vision tower; random models get a small one instead
    text_extra: dict[str, Any] = field(default_factory=dict)  # other text config fields

    @property
    def text_config(self) -> dict[str, Any]:
        """Text config fields a random model at this geometry takes beyond tiny.py's defaults."""
        return {
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-6,
            "rope_parameters": self.rope_parameters,
            **self.text_extra,
        }


# The Qwen2 7B decoder of Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision: head_dim 3584 / 28 = 128
# (their config.json has no head_dim); grouped-query attention with 4 key/value heads.
_QWEN2_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_layers": 28,
    "num_heads": 28,
    "num_kv_heads": 4,
    "head_dim": 128,
}
# Multimodal rotary embedding: temporal/height/width sections of head_dim / 2 = 64.
_MROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}

# Values from each checkpoint's config.json (and preprocessor_config.json for image sizes).
GEOMETRIES: dict[str, Geometry] = {
    "qwen2-vl-7b": Geometry(
        checkpoint="Qwen/Qwen2-VL-7B-Instruct",
        arch="qwen2_vl",
        **_QWEN2_7B,
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_parameters=_MROPE,
        vision={
            "depth": 32,
            "embed_dim": 1280,
            "num_heads": 16,
            "mlp_ratio": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,  # one visual token per 28 x 28 px
            "temporal_patch_size": 2,
            "min_pixels": 56 * 56,
            "max_pixels": 28 * 28 * 16384,  # up to 16,384 visual tokens per image
        },
    ),
    "qwen2.5-vl-7b": Geometry(
        checkpoint="Qwen/Qwen2.5-VL-7B-Instruct",
        arch="qwen2_5_vl",
        **_QWEN2_7B,
        vocab_size=152064,
        max_position_embeddings=128000,
        rope_parameters=_MROPE,
        vision={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "min_pixels": 56 * 56,
            "max_pixels": 28 * 28 * 16384,
        },
    ),
    "llava-onevision-qwen2-7b": Geometry(
        checkpoint="llava-hf/llava-onevision-qwen2-7b-ov-hf",
        arch="llava_onevision",
        **_QWEN2_7B,
        vocab_size=152128,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        vision={
            "model_type": "siglip_vision_model",  # SigLIP so400m-patch14-384
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 26,
            "num_attention_heads": 16,
            "image_size": 384,
            "patch_size": 14,  # 27 x 27 = 729 tokens per 384 px tile
            "image_grid_pinpoints": "384 px tiles, 1x1 to 6x6",
            "vision_aspect_ratio": "anyres_max_9",
        },
    ),
    "gemma-3-4b": Geometry(
        checkpoint="google/gemma-3-4b-it",
        arch="gemma3",
        hidden_size=2560,
        intermediate_size=10240,
        num_layers=34,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,  # not hidden / heads (320)
        vocab_size=262208,
        max_position_embeddings=131072,
        # Global layers: theta 1e6 with linear scaling x8; sliding-window layers: theta 1e4.
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        text_extra={"sliding_window": 1024, "query_pre_attn_scalar": 256},
        vision={
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "image_size": 896,
            "patch_size": 14,
            "mm_tokens_per_image": 256,  # 64 x 64 patches average-pooled to 16 x 16
        },
    ),
}


def geometry(name: str) -> Geometry:
    """A geometry by its key (`qwen2-vl-7b`) or checkpoint (`Qwen/Qwen2-VL-7B-Instruct`)."""
    wanted = name.strip().lower()
    for key, geo in GEOMETRIES.items():
        checkpoint = geo.checkpoint.lower()
        if wanted in (key, checkpoint, checkpoint.rsplit("/", 1)[-1]):
            return geo
    raise ConfigError(
        f"model config {name!r} is not known; choose one of {', '.join(GEOMETRIES)} "
        "(or their hub ids)"
    )


def build_geometry_model(
    name: str, out_dir: str | Path, layers: int = 1, intermediate_size: int | None = None
) -> Path:
    """A random model at `name`'s real width, heads and head_dim with `layers` decoder layers,
    saved in bfloat16 (as the checkpoints ship) with its processor to `out_dir`.

    `intermediate_size=None` keeps the real MLP width. The vision tower and vocabulary are
    tiny.py's small ones, so only the decoder's per-layer cost is real.
    """
    geo = geometry(name)
    if not 1 <= layers <= geo.num_layers:
        raise ConfigError(
            f"--layers {layers}: {geo.checkpoint} has {geo.num_layers} decoder layers; "
            f"choose 1 to {geo.num_layers}"
        )
    if intermediate_size is not None and intermediate_size < 1:
        raise ConfigError(f"intermediate_size {intermediate_size}: must be at least 1")
    return build_tiny_model(
        geo.arch,
        out_dir,
        num_layers=layers,
        hidden_size=geo.hidden_size,
        num_heads=geo.num_heads,
        num_kv_heads=geo.num_kv_heads,
        head_dim=geo.head_dim,
        intermediate_size=intermediate_size or geo.intermediate_size,
        text_config=geo.text_config,
        dtype=torch.bfloat16,
    )
