"""Tiny randomly initialised vision-language models, built offline for tests and examples.

Each architecture the project supports gets a 4-layer model (by default) with a 2-layer vision
tower, a byte-level BPE tokenizer trained here on generated text, a PIL-backend image processor
for small images, and a ChatML chat template. Saved to a directory, the model reloads with
`AutoModelForImageTextToText.from_pretrained(out_dir)` and the processor with
`sav_ray.processors.load_processor(out_dir)`, with `HF_HUB_OFFLINE=1`.

    python -c "from sav_ray.tiny import build_tiny_model; build_tiny_model('qwen2_vl', '/tmp/tiny')"

Image tokens per image:
- Qwen2-VL, Qwen2.5-VL: one per 28x28 px, images resized to 1-4 tokens (40x30 px: 1, 56x56: 4).
- LLaVA-1.5: 16 (56 px CLIP input, 14 px patches, CLS dropped).
- Gemma3: 4 soft tokens between begin- and end-of-image tokens.
- LLaVA-OneVision: 16 per 56 px tile; one image alone is tiled (anyres, 40x30 px: 36 tokens),
  each image of a multi-image prompt is 16 + 1 newline token.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessorPil,
    Gemma3Config,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    LlavaConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from sav_ray.processors import build_processor

ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava", "gemma3")

# Only these text models take a `head_dim` other than hidden_size / num_heads.
_FREE_HEAD_DIM = ("llava", "gemma3")

_PAD, _TURN_START, _TURN_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# The tokens each processor and model look up by name, and what one image is in a prompt.
_IMAGE_TOKENS = {
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "qwen2_5_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "llava_onevision": ["<image>", "<video>"],
    "llava": ["<image>"],
    "gemma3": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
}
_IMAGE_IN_PROMPT = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava_onevision": "<image>\n",
    "llava": "<image>\n",
    "gemma3": "<start_of_image>",
}

_PATCH = 14  # vision patch size, px
_IMAGE_SIZE = 56  # SigLIP / CLIP input size, px: (56 / 14) ** 2 = 16 patches
_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}

_WORDS = (
    "the a an is are of in on to and what which this that image picture photo show shows "
    "cat dog bird car boat tree house road river field forest sea sky person people "
    "red green blue yellow black white small large left right top bottom "
    "yes no answer question describe class label safe unsafe true false count how many"
).split()


def build_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int = 512,
    intermediate_size: int | None = None,
    text_config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    """Build a tiny `arch` model with its processor and save both to `out_dir`.

    `dtype`: the weights' dtype, built and saved (bfloat16 halves the memory of a 7B build).
    """
    model, processor = tiny_model_and_processor(
        arch,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab_size,
        intermediate_size=intermediate_size,
        text_config=text_config,
        dtype=dtype,
        seed=seed,
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def tiny_model_and_processor(
    arch: str,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int = 512,
    intermediate_size: int | None = None,
    text_config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The model (`dtype`, eval mode) and processor that `build_tiny_model` saves.

    `intermediate_size` defaults to 2 * hidden_size. `text_config` adds or overrides text
    config fields (e.g. a real checkpoint's `rope_parameters`, `rms_norm_eps`).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}) and num_heads "
            f"by num_kv_heads ({num_kv_heads})"
        )
    if head_dim is None:
        head_dim = hidden_size // num_heads
    elif head_dim != hidden_size // num_heads and arch not in _FREE_HEAD_DIM:
        raise ValueError(
            f"{arch} has head_dim = hidden_size / num_heads = {hidden_size // num_heads}; "
            f"head_dim={head_dim} works only for {', '.join(_FREE_HEAD_DIM)}"
        )

    tokenizer = build_tokenizer(arch, vocab_size)
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is below the tokenizer's {len(tokenizer)} tokens"
        )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _IMAGE_TOKENS[arch]}
    text = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 4096,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **(text_config or {}),
    }
    config, processor = _BUILDERS[arch](text, head_dim, ids, tokenizer)

    with torch.random.fork_rng(devices=[]):  # seed the weights, not the caller's generator
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.eval()
    return model, processor


def build_tokenizer(arch: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on generated text (deterministic), with `arch`'s
    image tokens, `<|endoftext|>` as pad, `<|im_end|>` as eos, and a chat template."""
    specials = [_PAD, _TURN_START, _TURN_END, *_IMAGE_TOKENS[arch]]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_corpus(), trainer=trainer)

    # Gemma3's processor reads its image tokens from these tokenizer attributes.
    named = (
        {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        }
        if arch == "gemma3"
        else {}
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=_PAD,
        eos_token=_TURN_END,
        padding_side="left",
        extra_special_tokens=named,
        chat_template=_chat_template(_IMAGE_IN_PROMPT[arch]),
    )


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 999)))
        lines.append(" ".join(words).capitalize() + rng.choice(["?", ".", "", ":"]))
    return lines


def _chat_template(image: str) -> str:
    """ChatML turns; a user turn's content items render in order (`image` for each image)."""
    # Text is emitted as Jinja string literals: `{%- -%}` would trim literal newlines.
    newline = "{{ '\\n' }}"
    image = "{{ " + json.dumps(image) + " }}"
    return (
        "{%- for message in messages -%}"
        f"{_TURN_START}{{{{ message['role'] }}}}{newline}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        f"{{%- if item['type'] == 'image' -%}}{image}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        f"{_TURN_END}{newline}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{_TURN_START}assistant{newline}{{%- endif -%}}"
    )


def _qwen_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """Qwen2-VL and Qwen2.5-VL configs name their special tokens the same way."""
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width rotary sections summing to head_dim / 2, in Qwen2-VL's 2:3:3 ratio."""
    half = head_dim // 2
    spatial = 3 * half // 8
    return [half - 2 * spatial, spatial, spatial]


def _qwen_image_processor() -> Qwen2VLImageProcessorPil:
    # One image token per 28x28 px (14 px patches merged 2x2); images resized to 1..4 tokens.
    return Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56})


def _qwen2_vl(
    text: dict[str, Any], head_dim: int, ids: dict[str, int], tokenizer: PreTrainedTokenizerFast
) -> tuple[PreTrainedConfig, ProcessorMixin]:
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(head_dim)}
    config = Qwen2VLConfig(
        text_config={"rope_parameters": rope, **text},
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "hidden_size": text["hidden_size"],
            "patch_size": _PATCH,
        },
        **_qwen_token_ids(ids),
    )
    processor = build_processor(
        Qwen2VLProcessor, _qwen_image_processor(), tokenizer, tokenizer.chat_template
    )
    return config, processor


def _qwen2_5_vl(
    text: dict[str, Any], head_dim: int, ids: dict[str, int], tokenizer: PreTrainedTokenizerFast
) -> tuple[PreTrainedConfig, ProcessorMixin]:
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(head_dim)}
    config = Qwen2_5_VLConfig(
        text_config={"rope_parameters": rope, **text},
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": text["hidden_size"],
            "patch_size": _PATCH,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        },
        **_qwen_token_ids(ids),
    )
    processor = build_processor(
        Qwen2_5_VLProcessor, _qwen_image_processor(), tokenizer, tokenizer.chat_template
    )
    return config, processor


def _llava_onevision(
    text: dict[str, Any], head_dim: int, ids: dict[str, int], tokenizer: PreTrainedTokenizerFast
) -> tuple[PreTrainedConfig, ProcessorMixin]:
    # Tiles of the SigLIP input size; one image picks the best of these grids (anyres).
    pinpoints = [[_IMAGE_SIZE * h, _IMAGE_SIZE * w] for h in (1, 2) for w in (1, 2)]
    config = LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **text},
        vision_config={
            "model_type": "siglip_vision_model",
            **_VISION,
            "num_attention_heads": 2,
            "image_size": _IMAGE_SIZE,
            "patch_size": _PATCH,
        },
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}, image_grid_pinpoints=pinpoints
    )
    processor = build_processor(
        LlavaOnevisionProcessor,
        image_processor,
        tokenizer,
        tokenizer.chat_template,
        num_image_tokens=(_IMAGE_SIZE // _PATCH) ** 2,
        vision_feature_select_strategy="full",
    )
    return config, processor


def _llava(
    text: dict[str, Any], head_dim: int, ids: dict[str, int], tokenizer: PreTrainedTokenizerFast
) -> tuple[PreTrainedConfig, ProcessorMixin]:
    config = LlavaConfig(
        text_config={"model_type": "llama", **text, "head_dim": head_dim},
        vision_config={
            "model_type": "clip_vision_model",
            **_VISION,
            "num_attention_heads": 2,
            "image_size": _IMAGE_SIZE,
            "patch_size": _PATCH,
        },
        image_token_index=ids["<image>"],
        image_seq_length=(_IMAGE_SIZE // _PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    )
    processor = build_processor(
        LlavaProcessor,
        image_processor,
        tokenizer,
        tokenizer.chat_template,
        patch_size=_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )
    return config, processor


def _gemma3(
    text: dict[str, Any], head_dim: int, ids: dict[str, int], tokenizer: PreTrainedTokenizerFast
) -> tuple[PreTrainedConfig, ProcessorMixin]:
    tokens_per_image = 4  # the 4x4 patch grid average-pooled to 2x2
    config = Gemma3Config(
        text_config={
            "model_type": "gemma3_text",
            "query_pre_attn_scalar": head_dim,
            **text,
            "head_dim": head_dim,
        },
        vision_config={
            "model_type": "siglip_vision_model",
            **_VISION,
            "num_attention_heads": 2,
            "image_size": _IMAGE_SIZE,
            "patch_size": _PATCH,
        },
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE})
    processor = build_processor(
        Gemma3Processor,
        image_processor,
        tokenizer,
        tokenizer.chat_template,
        image_seq_length=tokens_per_image,
    )
    return config, processor


_BUILDERS = {
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "llava_onevision": _llava_onevision,
    "llava": _llava,
    "gemma3": _gemma3,
}


# The demo model: 6 layers x 8 heads = 48 heads, enough for k=20 (the default 4 x 4 has 16);
# on demo_data's images its SAVs reach >= 0.9 test accuracy.
DEMO_MODEL = {"arch": "qwen2_vl", "num_layers": 6, "hidden_size": 128, "num_heads": 8}


def build_demo_model(out_dir: str | Path) -> Path:
    spec = dict(DEMO_MODEL)
    return build_tiny_model(spec.pop("arch"), out_dir, **spec)
