"""Benchmark rows of preprocessing: the model actor's forward share, and resolution's token cost.

- `forward_share_row`: with the processor in Ray Data CPU tasks, the model actor only collates,
  moves, runs the forward pass and captures. The actor times its forward pass and its whole
  `__call__`; the fit sums both over its batches (`FitStats.forward_seconds`, `busy_seconds`);
  the row is their ratio, from the benchmark's own fit, target >= 0.9.
- `visual_tokens`: visual tokens one large image (1920x1080) costs a Qwen2-VL processor at its
  checkpoint's default resolution and at a `--max-image-pixels` limit, counted as the image
  tokens in the prompt the language model reads.

    row = forward_share_row(fit(cfg)[1])
    row = visual_tokens(max_image_pixels=448 * 448)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from sav_ray.bench.rows import Row
from sav_ray.core.model_inputs import encode_row
from sav_ray.core.prompts import Example, PromptConfig
from sav_ray.core.resolution import Preprocessing
from sav_ray.pipelines.fitting import FitStats

# Qwen2-VL-7B-Instruct's preprocessor_config.json: min_pixels, max_pixels (28x28 px per token).
QWEN2_VL_MIN_PIXELS, QWEN2_VL_MAX_PIXELS = 56 * 56, 28 * 28 * 16384
PIXELS_PER_TOKEN = 28 * 28


def forward_share_row(stats: FitStats) -> Row:
    """The row from a fit's stats (a fit that ran the model, not one from saved vectors)."""
    forward, busy = stats.forward_seconds, stats.busy_seconds
    return Row(
        key="actor_forward_share",
        title="Share of the model actor's busy time spent in the forward pass",
        value=forward / busy if busy else float("nan"),
        op=">=",
        threshold=0.9,
        measured={"forward_s": forward, "busy_s": busy, "rows": stats.examples},
        note=(
            "sums over the fit's batches of the actor's forward-pass time and of its whole "
            "__call__ (unpack, collate, move to device, forward, capture, output); the "
            "processor runs in Ray Data CPU tasks ahead of the actors"
        ),
        if_missed=(
            "the actor spends over a tenth of its time outside the forward pass: collate and "
            "moving inputs weigh against a small or fast model (a tiny model on the CPU, or a "
            "GPU with small batches)"
        ),
    )


def qwen2_vl_processor() -> Any:
    """A Qwen2-VL processor at Qwen2-VL-7B-Instruct's default resolution (tokenizer: tiny)."""
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from sav_ray.core.processors import build_processor
    from sav_ray.fixtures.tiny import build_tokenizer

    tokenizer = build_tokenizer("qwen2_vl")
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=QWEN2_VL_MIN_PIXELS, max_pixels=QWEN2_VL_MAX_PIXELS
    )
    return build_processor(Qwen2VLProcessor, image_processor, tokenizer, tokenizer.chat_template)


def count_visual_tokens(processor: Any, image: Image.Image, prep: Preprocessing) -> int:
    """Image tokens in the prompt of one image (what the language model attends over)."""
    row = encode_row(processor, Example("What is it?", [image]), PromptConfig(), prep)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int((row["input_ids"] == image_token).sum())


def visual_tokens(
    max_image_pixels: int = 448 * 448,
    size: tuple[int, int] = (1920, 1080),
    processor: Any = None,
) -> Row:
    """Visual tokens of one `size` (width, height) image: default against `max_image_pixels`."""
    processor = processor or qwen2_vl_processor()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # [height, width, 3]
    image = Image.fromarray(pixels)
    default = count_visual_tokens(processor, image, Preprocessing())
    limited = count_visual_tokens(
        processor, image, Preprocessing(max_image_pixels=max_image_pixels)
    )
    allowed = max_image_pixels // PIXELS_PER_TOKEN
    return Row(
        key="visual_tokens_limited",
        title=f"Visual tokens of a {size[0]}x{size[1]} image at --max-image-pixels {max_image_pixels}",
        value=float(limited),
        op="<=",
        threshold=float(allowed),
        measured={
            "tokens_default": default,
            "tokens_limited": limited,
            "max_image_pixels": max_image_pixels,
            "default_max_pixels": QWEN2_VL_MAX_PIXELS,
        },
        note=(
            "Qwen2-VL processor (PIL backend) at Qwen2-VL-7B-Instruct's min/max pixels; image "
            "tokens counted in the rendered prompt; the limit allows one token per 28x28 px"
        ),
        if_missed="the processor did not apply the pixel limit: check resolution_plan",
    )
