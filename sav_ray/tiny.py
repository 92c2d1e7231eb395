"""Tiny randomly initialised vision-language models and text LLMs, built offline for tests and
examples.

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
- PaliGemma: 16 (SigLIP, 56 px); no chat template (PALIGEMMA_CHAT_TEMPLATE is one to give).
- SmolVLM: 4 (16 patches, pixel shuffle 2), between fake-image and global-image tokens.
- Mllama: one `<|image|>` token; the image enters through cross-attention layers 1 and 3 (of 4).

Text LLMs (`TEXT_ARCHITECTURES`: Qwen2, Llama) save a tokenizer and no processor, as their hub
checkpoints do; they reload with `AutoModelForCausalLM` and `load_processor` gives a
`TextProcessor`. Their chat templates take a message's content as one string, as the real
ones do; the Llama one starts with a BOS token that its tokenizer would also add, and it has
no pad token.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers import processors as token_processors
from transformers import (
    CLIPImageProcessorPil,
    Gemma3Config,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    MllamaConfig,
    MllamaImageProcessorPil,
    MllamaProcessor,
    PaliGemmaConfig,
    PaliGemmaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    SiglipImageProcessorPil,
    SmolVLMConfig,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
)

from sav_ray.models import model_class
from sav_ray.processors import TextProcessor, build_processor
from sav_ray.prompts import Example

ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava", "gemma3")
TEXT_ARCHITECTURES = ("qwen2", "llama")  # text LLMs: no vision tower, no processor
# Multimodal models whose processors need torchvision (not installable on a CPU-only machine):
# only their models are built, to test their decoders on token ids (`tiny_model_without_processor`).
NO_PROCESSOR_ARCHITECTURES = ("llama4", "phi4_multimodal")
# More families, tested on their own (tests/test_vlm_families.py) rather than by every test
# that runs over ARCHITECTURES. PaliGemma saves no chat template, as its base checkpoints.
VLM_FAMILIES = ("paligemma", "smolvlm", "mllama")

# A chat template for PaliGemma (`--chat-template`): its prompts are the images, then the text;
# the processor adds the image tokens, bos after the last image and "\n" after the text.
PALIGEMMA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<image>{%- else -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endfor -%}"
)

# Only these text models take a `head_dim` other than hidden_size / num_heads.
_FREE_HEAD_DIM = ("llava", "gemma3")

_PAD, _TURN_START, _TURN_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
_LLAMA_BOS = "<|begin_of_text|>"

# The tokens each processor and model look up by name, and what one image is in a prompt.
_IMAGE_TOKENS = {
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "qwen2_5_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "llava_onevision": ["<image>", "<video>"],
    "llava": ["<image>"],
    "gemma3": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
    "qwen2": [],
    "llama": [_LLAMA_BOS],
    "paligemma": ["<image>"],
    "smolvlm": ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"],
    "mllama": ["<|image|>", "<|begin_of_text|>"],
}
_IMAGE_IN_PROMPT = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava_onevision": "<image>\n",
    "llava": "<image>\n",
    "gemma3": "<start_of_image>",
    "qwen2": "",
    "llama": "",
    "paligemma": "<image>",
    "smolvlm": "<image>",
    "mllama": "<|image|>",
}

_MIN_VOCAB = {"paligemma": 1792}

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
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(_BUILDERS)}")
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
    # PaliGemma's processor adds 1,152 location and segmentation tokens to the tokenizer.
    vocab_size = max(vocab_size, _MIN_VOCAB.get(arch, 0))
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
        model = model_class(config).from_config(config, dtype=dtype)
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


def _text_template(bos: str = "") -> str:
    """ChatML turns whose content is one string, as text LLMs' templates read it: a content
    list (a VLM's turn) is an error, not rendered as its Python repr."""
    newline = "{{ '\\n' }}"
    return (
        (f"{{{{ {json.dumps(bos)} }}}}" if bos else "") + "{%- for message in messages -%}"
        "{%- if message['content'] is not string -%}"
        "{{ raise_exception('message content must be a string') }}{%- endif -%}"
        f"{_TURN_START}{{{{ message['role'] }}}}{newline}{{{{ message['content'] }}}}"
        f"{_TURN_END}{newline}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{_TURN_START}assistant{newline}{{%- endif -%}}"
    )


def _qwen2(
    text: dict[str, Any], head_dim: int, ids: dict[str, int], tokenizer: PreTrainedTokenizerFast
) -> tuple[PreTrainedConfig, TextProcessor]:
    tokenizer.chat_template = _text_template()
    return Qwen2Config(**text), TextProcessor(tokenizer)


def _llama(
    text: dict[str, Any], head_dim: int, ids: dict[str, int], tokenizer: PreTrainedTokenizerFast
) -> tuple[PreTrainedConfig, TextProcessor]:
    # As Llama 3: the tokenizer adds a BOS token, the chat template writes one, no pad token.
    bos = ids[_LLAMA_BOS]
    tokenizer.bos_token, tokenizer.pad_token = _LLAMA_BOS, None
    tokenizer.backend_tokenizer.post_processor = token_processors.TemplateProcessing(
        single=f"{_LLAMA_BOS} $A",
        pair=f"{_LLAMA_BOS} $A {_LLAMA_BOS} $B",
        special_tokens=[(_LLAMA_BOS, bos)],
    )
    tokenizer.chat_template = _text_template(_LLAMA_BOS)
    config = LlamaConfig(**{**text, "pad_token_id": None, "bos_token_id": bos}, head_dim=head_dim)
    return config, TextProcessor(tokenizer)


def _paligemma(
    text: dict[str, Any], head_dim: int, ids: dict[str, int], tokenizer: PreTrainedTokenizerFast
) -> tuple[PreTrainedConfig, ProcessorMixin]:
    tokens_per_image = (_IMAGE_SIZE // _PATCH) ** 2
    config = PaliGemmaConfig(
        text_config={"model_type": "gemma", **text, "head_dim": head_dim},
        vision_config={
            "model_type": "siglip_vision_model",
            **_VISION,
            "num_attention_heads": 2,
            "image_size": _IMAGE_SIZE,
            "patch_size": _PATCH,
            "num_image_tokens": tokens_per_image,
            "projection_dim": text["hidden_size"],
        },
        image_token_index=ids["<image>"],
        projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"],
        vocab_size=text["vocab_size"],
    )
    image_processor = SiglipImageProcessorPil(size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE})
    image_processor.image_seq_length = tokens_per_image
    tokenizer.chat_template = None  # base PaliGemma checkpoints have none: --chat-template
    tokenizer.bos_token = _PAD  # the processor puts bos between the images and the text
    processor = build_processor(PaliGemmaProcessor, image_processor, tokenizer)
    return config, processor


def _smolvlm(
    text: dict[str, Any], head_dim: int, ids: dict[str, int], tokenizer: PreTrainedTokenizerFast
) -> tuple[PreTrainedConfig, ProcessorMixin]:
    scale_factor = 2  # pixel shuffle: 4x4 patches -> 4 image tokens
    tokens_per_image = (_IMAGE_SIZE // _PATCH) ** 2 // scale_factor**2
    config = SmolVLMConfig(
        text_config={"model_type": "llama", **text, "head_dim": head_dim},
        vision_config={
            **_VISION,
            "num_attention_heads": 2,
            "image_size": _IMAGE_SIZE,
            "patch_size": _PATCH,
        },
        image_token_id=ids["<image>"],
        scale_factor=scale_factor,
    )
    image_processor = SmolVLMImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": _IMAGE_SIZE},
        max_image_size={"longest_edge": _IMAGE_SIZE},
    )
    processor = build_processor(
        SmolVLMProcessor,
        image_processor,
        tokenizer,
        tokenizer.chat_template,
        image_seq_len=tokens_per_image,
    )
    return config, processor


def _mllama(
    text: dict[str, Any], head_dim: int, ids: dict[str, int], tokenizer: PreTrainedTokenizerFast
) -> tuple[PreTrainedConfig, ProcessorMixin]:
    # Every other decoder layer is a cross-attention layer (no self_attn), as in Llama 3.2 Vision.
    layers = text["num_hidden_layers"]
    config = MllamaConfig(
        text_config={
            **text,
            "head_dim": head_dim,
            "cross_attention_layers": list(range(1, layers, 2)),
            "bos_token_id": ids["<|begin_of_text|>"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "attention_heads": 2,
            "image_size": _IMAGE_SIZE,
            "patch_size": _PATCH,
            "max_num_tiles": 2,
            "intermediate_layers_indices": [0],
            "vision_output_dim": 2 * 32,
            "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
        },
        image_token_index=ids["<|image|>"],
    )
    tokenizer.bos_token = "<|begin_of_text|>"
    image_processor = MllamaImageProcessorPil(
        size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}, max_image_tiles=2
    )
    processor = build_processor(
        MllamaProcessor, image_processor, tokenizer, tokenizer.chat_template
    )
    return config, processor


_BUILDERS = {
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "llava_onevision": _llava_onevision,
    "llava": _llava,
    "gemma3": _gemma3,
    "qwen2": _qwen2,
    "llama": _llama,
    "paligemma": _paligemma,
    "smolvlm": _smolvlm,
    "mllama": _mllama,
}


def tiny_model_without_processor(
    arch: str,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
) -> PreTrainedModel:
    """A tiny random `arch` model (NO_PROCESSOR_ARCHITECTURES), float32, eval mode, built with the
    class `sav_ray.models.model_class` picks: Llama 4 as image-text-to-text (its decoder layers
    one level below `get_decoder()`), Phi-4-multimodal as a causal LM. Token ids 0-2 are pad,
    BOS and EOS."""
    from transformers import Llama4Config, Phi4MultimodalConfig

    text = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 4096,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    if arch == "llama4":
        config = Llama4Config(
            text_config={
                **text,
                "head_dim": hidden_size // num_heads,
                "intermediate_size_mlp": 2 * hidden_size,
                "num_local_experts": 2,  # a mixture-of-experts MLP, as Llama 4 Scout's
                "num_experts_per_tok": 1,
            },
            vision_config={
                **tower,
                "num_hidden_layers": 2,
                "image_size": _IMAGE_SIZE,
                "patch_size": _PATCH,
                "vision_output_dim": hidden_size,
                "projector_input_dim": hidden_size,
                "projector_output_dim": hidden_size,
            },
        )
    elif arch == "phi4_multimodal":
        config = Phi4MultimodalConfig(
            **text,
            vision_config={
                **tower,
                "num_hidden_layers": 1,
                "image_size": _IMAGE_SIZE,
                "crop_size": _IMAGE_SIZE,
                "patch_size": _PATCH,
                "image_token_id": vocab_size - 2,
            },
            audio_config={
                **tower,
                "num_blocks": 1,
                "depthwise_separable_out_channel": 32,
                "ext_pw_out_channel": 32,
                "nemo_conv_channels": 32,
                "audio_token_id": vocab_size - 1,
            },
        )
    else:
        raise ValueError(
            f"unknown arch {arch!r}; choose one of {', '.join(NO_PROCESSOR_ARCHITECTURES)}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).from_config(config)
    return model.eval()


# The demo model: 6 layers x 8 heads = 48 heads, enough for k=20 (the default 4 x 4 has 16);
# on demo_data's images its SAVs reach >= 0.9 test accuracy.
DEMO_MODEL = {"arch": "qwen2_vl", "num_layers": 6, "hidden_size": 128, "num_heads": 8}


def build_demo_model(out_dir: str | Path) -> Path:
    spec = dict(DEMO_MODEL)
    return build_tiny_model(spec.pop("arch"), out_dir, **spec)


def random_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """An RGB image of uniform noise, `size` = (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def sample_examples() -> list[Example]:
    """Three prompts of different lengths and image counts (one with `<image>` placeholders):
    what the capture tests batch, so that padding and image placement are exercised."""
    return [
        Example("What is in the image?", [random_image(0, (56, 56))]),
        Example(
            "a much longer question about the picture shown here, please",
            [random_image(1, (40, 64))],
        ),
        Example(
            "Compare <image> with <image>: same?",
            [random_image(2, (56, 48)), random_image(3, (32, 32))],
        ),
    ]
