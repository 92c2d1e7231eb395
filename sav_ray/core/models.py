"""Model adapters: load a frozen decoder-only model by capability and find its attention heads.

The model class is chosen from the config alone (`model_class`): image-text-to-text first
(Qwen2-VL, LLaVA, Gemma3, Llama 4, ...), then causal LM (text LLMs such as Qwen2 and Llama, and
multimodal models registered as causal LMs such as Phi-4-multimodal). Encoder-decoder models
are refused: their prompt goes to the encoder. The decoder layers are found wherever the model
nests them (`decoder_layers`), each with `self_attn.o_proj`. The input of `o_proj` is every
head's attention output concatenated, `[batch, seq, num_heads * head_dim]`, so `head_dim` is
read from `o_proj.in_features`, never from the config (Qwen2-VL's text config has none).
Decoders that interleave cross-attention layers (Mllama: no `self_attn`) have their
self-attention layers captured; `HeadLayout.layer_ids` maps a captured layer to its decoder layer.

    lm = load_model("Qwen/Qwen2-VL-7B-Instruct", revision="main")   # GPU: bfloat16, else float32
    lm.info        # BaseModelInfo(num_layers=28, num_heads=28, head_dim=128, revision="<commit>")
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sav_ray.core.artifact import BaseModelInfo
from sav_ray.core.errors import ConfigError


class ModelLayoutError(LookupError):
    """The model is not laid out as decoder layers with `self_attn.o_proj`."""


class UnsupportedModelError(ValueError):
    """The model is neither image-text-to-text nor a causal LM, or is an encoder-decoder."""


def encoder_decoder_reason(config: Any) -> str | None:
    """Why an encoder-decoder model cannot give SAVs, or None for any other model."""
    text = config.get_text_config()
    if not (config.is_encoder_decoder or getattr(text, "is_encoder_decoder", False)):
        return None
    return (
        f"a {config.model_type!r} model is an encoder-decoder: the prompt goes to its encoder "
        "and its decoder only reads it through cross-attention, while SAVs read a decoder-only "
        "model's attention heads at the last prompt token; use a decoder-only model (an "
        "image-text-to-text model such as Qwen2-VL, or a causal LM such as Qwen2)"
    )


def model_class(config: Any) -> type:
    """The Auto class that builds `config`'s model: image-text-to-text first, then causal LM.

    Decided from the auto mappings, so a config that neither builds (or an encoder-decoder)
    is refused with the reason, before any weights are read.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
    )

    reason = encoder_decoder_reason(config)
    if reason:
        raise UnsupportedModelError(reason)
    if type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return AutoModelForImageTextToText
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    raise UnsupportedModelError(
        f"a {config.model_type!r} model is neither an image-text-to-text model nor a causal "
        "language model (neither AutoModelForImageTextToText nor AutoModelForCausalLM builds "
        "it); sav-ray needs a generative decoder such as Qwen2-VL, LLaVA-OneVision or Qwen2"
    )


@dataclass(frozen=True)
class HeadLayout:
    """Where a model's heads are: one `o_proj` per decoder layer."""

    o_projs: tuple[nn.Linear, ...]  # [layer]
    num_heads: int
    head_dim: int
    layer_ids: tuple[int, ...] | None = None  # decoder layer of each o_proj; None: 0, 1, 2, ...

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


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layers, wherever the model nests them: `get_decoder().layers` (VLMs, text
    LLMs), or one level further down where `get_decoder()` returns a causal LM (Llama 4's
    `language_model.model.layers`). An encoder-decoder model is refused with the reason."""
    cls = type(model).__name__
    config = getattr(model, "config", None)
    reason = encoder_decoder_reason(config) if config is not None else None
    if reason:
        raise ModelLayoutError(f"{cls}: {reason}")
    module, seen = model, []
    while module is not None and not any(module is s for s in seen):
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
        seen.append(module)
        inner = module.get_decoder() if hasattr(module, "get_decoder") else None
        # A causal LM's get_decoder() may return itself; its decoder is then `.model`.
        module = (
            inner if inner is not None and inner is not module else getattr(module, "model", None)
        )
    raise ModelLayoutError(
        f"{cls}: no decoder layers found at model.get_decoder().layers (nor one level further "
        "down); sav-ray supports decoders laid out as layers[i].self_attn.o_proj"
    )


def find_heads(model: nn.Module) -> HeadLayout:
    """Find every decoder layer's `self_attn.o_proj`; LookupError names the model class otherwise."""
    cls = type(model).__name__
    layers = decoder_layers(model)
    o_projs, layer_ids = [], []
    for i, layer in enumerate(layers):
        if not hasattr(layer, "self_attn") and hasattr(layer, "cross_attn"):
            continue  # its queries attend to the image, not to the prompt: no SAV heads
        o_proj = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        if not isinstance(o_proj, nn.Linear):
            raise ModelLayoutError(
                f"{cls}: decoder layer {i} has no self_attn.o_proj linear layer; sav-ray "
                "supports decoders laid out as layers[i].self_attn.o_proj"
            )
        o_projs.append(o_proj)
        layer_ids.append(i)
    if not o_projs:
        raise ModelLayoutError(f"{cls}: no decoder layer has self-attention")
    num_heads = model.config.get_text_config().num_attention_heads
    in_features = o_projs[0].in_features
    if in_features % num_heads:
        raise ModelLayoutError(
            f"{cls}: o_proj.in_features={in_features} is not a multiple of "
            f"num_attention_heads={num_heads}"
        )
    return HeadLayout(
        o_projs=tuple(o_projs),
        num_heads=num_heads,
        head_dim=in_features // num_heads,
        layer_ids=None if layer_ids == list(range(len(layers))) else tuple(layer_ids),
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
    """Load a frozen decoder-only model and its processor, by hub id + revision or folder.

    The model class comes from the config (`model_class`); the processor is the checkpoint's
    own, or its tokenizer alone for a text LLM (`sav_ray.core.processors.load_processor`).
    `device_map` ("auto", "balanced", or a dict) lets accelerate spread a model over several
    GPUs; otherwise the model goes whole to `device` (default: cuda if available, else cpu).
    """
    from transformers import AutoConfig

    from sav_ray.core.processors import load_processor, modalities

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    local = Path(name_or_path).is_dir()
    hub: dict[str, Any] = {"local_files_only": True} if local else {"revision": revision}
    kwargs: dict[str, Any] = {"dtype": torch_dtype, **hub}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    config = AutoConfig.from_pretrained(name_or_path, **hub)
    model = model_class(config).from_pretrained(name_or_path, config=config, **kwargs)
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
        modalities=modalities(processor),
        layer_ids=layout.layer_ids,
    )
    return LoadedModel(model=model, processor=processor, layout=layout, info=info)
