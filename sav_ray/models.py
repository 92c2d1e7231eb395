"""Model adapters: load a frozen image-text-to-text model and find its attention heads.

Any Hugging Face decoder laid out as `model.get_decoder().layers[i].self_attn.o_proj` works
(Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, LLaVA, Gemma3, ...). The input of `o_proj` is every
head's attention output concatenated, `[batch, seq, num_heads * head_dim]`, so `head_dim` is
read from `o_proj.in_features`, never from the config (Qwen2-VL's text config has none).

    lm = load_model("Qwen/Qwen2-VL-7B-Instruct", revision="main")   # GPU: bfloat16, else float32
    lm.info        # BaseModelInfo(num_layers=28, num_heads=28, head_dim=128, revision="<commit>")
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sav_ray.artifact import BaseModelInfo
from sav_ray.errors import ConfigError

if TYPE_CHECKING:
    from sav_ray.config import ModelConfig


class ModelLayoutError(LookupError):
    """The model is not laid out as decoder layers with `self_attn.o_proj`."""


@dataclass(frozen=True)
class HeadLayout:
    """Where a model's heads are: one `o_proj` per decoder layer."""

    o_projs: tuple[nn.Linear, ...]  # [layer]
    num_heads: int
    head_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.o_projs)


@dataclass
class LoadedModel:
    """A frozen model, its processor and the facts the artifact records about it."""

    model: nn.Module
    processor: Any
    layout: HeadLayout
    info: BaseModelInfo
    placement: dict[str, Any] | None = None  # in an actor: {node, pid, gpu_ids, device}

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


def find_heads(model: nn.Module) -> HeadLayout:
    """Find every decoder layer's `self_attn.o_proj`; LookupError names the model class otherwise."""
    cls = type(model).__name__
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        raise ModelLayoutError(
            f"{cls}: no decoder layers found at model.get_decoder().layers; sav-ray supports "
            "decoders laid out as layers[i].self_attn.o_proj"
        )
    o_projs = []
    for i, layer in enumerate(layers):
        o_proj = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        if not isinstance(o_proj, nn.Linear):
            raise ModelLayoutError(
                f"{cls}: decoder layer {i} has no self_attn.o_proj linear layer; sav-ray "
                "supports decoders laid out as layers[i].self_attn.o_proj"
            )
        o_projs.append(o_proj)
    num_heads = model.config.get_text_config().num_attention_heads
    in_features = o_projs[0].in_features
    if in_features % num_heads:
        raise ModelLayoutError(
            f"{cls}: o_proj.in_features={in_features} is not a multiple of "
            f"num_attention_heads={num_heads}"
        )
    return HeadLayout(
        o_projs=tuple(o_projs), num_heads=num_heads, head_dim=in_features // num_heads
    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """`None`/"auto": bfloat16 on GPU, float32 on CPU; otherwise the named torch dtype."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ConfigError(
            f"--dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16"
        )
    return resolved


def local_revision(path: Path) -> str:
    """A content hash of a local checkpoint (config and weights), standing in for a commit hash."""
    h = hashlib.sha256()
    files = sorted(
        p for p in path.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin")
    )
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def resolve_revision(name_or_path: str, revision: str | None, model: nn.Module) -> str | None:
    """The commit hash for hub models; a content hash for local folders (which have no commit)."""
    if Path(name_or_path).is_dir():
        return local_revision(Path(name_or_path))
    return getattr(model.config, "_commit_hash", None) or revision


def load_model(
    name_or_path: str,
    revision: str | None = None,
    *,
    dtype: str | None = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a frozen image-text-to-text model and its processor, by hub id + revision or folder.

    `device_map` ("auto", "balanced", or a dict) lets accelerate spread a model over several
    GPUs; otherwise the model goes whole to `device` (default: cuda if available, else cpu).
    """
    from transformers import AutoModelForImageTextToText

    from sav_ray.processors import load_processor

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    local = Path(name_or_path).is_dir()
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if not local:
        kwargs["revision"] = revision
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if local:
        kwargs["local_files_only"] = True
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    if device_map is None:
        model = model.to(device)
    model.eval().requires_grad_(False)
    processor = load_processor(name_or_path, revision=None if local else revision)
    layout = find_heads(model)
    info = BaseModelInfo(
        name_or_path=str(name_or_path),
        revision=resolve_revision(str(name_or_path), revision, model),
        architecture=type(model).__name__,
        num_layers=layout.num_layers,
        num_heads=layout.num_heads,
        head_dim=layout.head_dim,
        dtype=str(torch_dtype).removeprefix("torch."),
    )
    return LoadedModel(model=model, processor=processor, layout=layout, info=info)


def load_actor_model(cfg: ModelConfig, expect: BaseModelInfo | None = None) -> LoadedModel:
    """Load the model inside a Ray actor, on the GPU Ray assigned it or on the CPU (a CPU actor
    never touches a GPU: sav_ray.placement); torch threads match the actor's CPU share (so
    actors do not oversubscribe the node). Given `expect`, refuse a model it was not fitted on.
    The placement (node, pid, GPU ids, device) is recorded on the returned model."""
    from sav_ray.placement import actor_placement

    placement = actor_placement()  # before anything initialises CUDA
    if cfg.cpus_per_actor >= 1:
        torch.set_num_threads(int(cfg.cpus_per_actor))
    on_gpu = placement["device"].startswith("cuda")
    lm = load_model(
        cfg.model,
        cfg.revision,
        dtype=cfg.dtype,
        device=placement["device"],
        device_map=cfg.device_map if on_gpu else None,  # accelerate's map over visible GPUs
    )
    if expect is not None:
        expect.check_compatible(lm.info)
    lm.placement = {**placement, "device": str(lm.input_device)}
    return lm
