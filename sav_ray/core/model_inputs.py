"""Model inputs: one example -> its processor output (one row, unpadded) -> a padded batch.

The processor (chat template, tokenisation, image resize and normalisation) runs on ONE row at a
time (`encode_row`), wherever is convenient: Ray Data CPU tasks for the jobs, in-process for the
MLflow model and the server. `collate` then builds the batch the processor itself would have
produced for those rows with left padding, so the model (and the vectors) cannot tell the
difference; tests check every key against the batched processor output for every tiny
architecture. The rules come from the tensors, not from a table per model:
- sequence tensors (a per-row shape starting with `input_ids`'s, `[1, seq]`: input_ids,
  attention_mask, token_type_ids, mm_token_type_ids, Mllama's cross_attention_mask
  `[1, seq, image, tile]`, ...) are left-padded to the longest row, with the tokenizer's pad id
  for input_ids and 0 otherwise (0 is "padding" in the masks); any trailing dims are
  zero-padded to the largest;
- every other tensor (pixel_values, image_grid_thw, image_sizes, batch_num_images, ...) is
  per image or per image row: concatenated on dim 0, trailing dims zero-padded to the largest
  (LLaVA-OneVision pads its tile dim so). Rows without images simply have none.

A row's video (its sampled frames) goes to the processor's `videos` where the processor takes
video natively, else as images ahead of the row's images (`video_input`; the artifact records
which, so inference gives videos in the same form as the fit).

`row_to_bytes` / `row_from_bytes` carry a row between processes as a safetensors blob.

    rows = [encode_row(processor, ex, prompt, prep) for ex in examples]
    batch = collate(rows, processor.tokenizer.pad_token_id)   # == processor(..., padding=True)
"""

from __future__ import annotations

import inspect
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F

from sav_ray.core.errors import ConfigError
from sav_ray.core.prompts import VIDEO_AS_IMAGES, VIDEO_NATIVE, Example, PromptConfig, render
from sav_ray.core.resolution import NO_LIMITS, Preprocessing, limit_area, resolution_plan

# Inputs a processor may return that a forward pass for inference must not get (PaliGemma's
# processor returns `labels` for backward compatibility; given them, the model computes a loss).
TRAINING_ONLY = frozenset({"labels"})


def encode_row(
    processor: Any,
    example: Example,
    prompt: PromptConfig,
    preprocessing: Preprocessing = NO_LIMITS,
) -> dict[str, torch.Tensor]:
    """The processor's output for one example: tensor name -> tensor (`[1, seq]` for tokens),
    without training-only outputs (`labels`)."""
    mode = video_input(processor, preprocessing)
    text = render(processor, example, prompt, mode)
    images, kwargs = example.images, {}
    if example.video and mode == VIDEO_NATIVE:
        kwargs["videos"] = [example.video]
    elif example.video:
        images = example.video + example.images
    if images:
        plan = resolution_plan(processor, preprocessing)
        kwargs.update(images=[limit_area(images, plan.max_image_area)], **plan.call_kwargs)
    out = processor(text=[text], return_tensors="pt", **kwargs)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and k not in TRAINING_ONLY}


def video_input(processor: Any, preprocessing: Preprocessing = NO_LIMITS) -> str:
    """How videos reach `processor`: the recorded `preprocessing.video_input`, else natively
    where the processor has a video processor (transformers builds those only with
    torchvision), else as images."""
    # bool, not `is not None`: a required video processor that could not load is a false stand-in
    native = bool(getattr(processor, "video_processor", None))
    if preprocessing.video_input == VIDEO_NATIVE and not native:
        raise ConfigError(
            "the SAV was fitted with videos as the processor's native video input, but this "
            "processor has no video processor (transformers builds them only where torchvision "
            "is installed); install torchvision, or refit where videos are given as images"
        )
    if preprocessing.video_input is not None:
        return preprocessing.video_input
    return VIDEO_NATIVE if native else VIDEO_AS_IMAGES


def row_to_bytes(row: dict[str, torch.Tensor]) -> bytes:
    """A row's tensors as one safetensors blob: no pickle, dtypes and shapes kept."""
    return safetensors.torch.save({k: v.contiguous() for k, v in row.items()})


def row_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(bytes(data))


def collate(rows: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """N rows of `encode_row` -> the batch the processor gives for them with left padding."""
    if not rows:
        raise ValueError("collate needs at least one row")
    seq = max(r["input_ids"].shape[1] for r in rows)
    names = list(dict.fromkeys(k for r in rows for k in r))
    batch: dict[str, torch.Tensor] = {}
    for name in names:
        present = [r[name] for r in rows if name in r]
        trailing = [max(t.shape[d] for t in present) for d in range(1, present[0].dim())]
        # a token sequence starts with each row's input_ids shape, [1, seq]
        if all(r[name].shape[:2] == r["input_ids"].shape for r in rows if name in r):
            if len(present) != len(rows):
                raise ValueError(f"collate: {name!r} is a token sequence but some rows lack it")
            value = pad_token_id if name == "input_ids" else 0
            batch[name] = torch.cat(
                [_pad(t, _widths(t, trailing, left=seq), value) for t in present]
            )  # [batch, seq, *largest trailing dims]
            continue
        padded = [_pad(t, _widths(t, trailing), 0) for t in present]
        batch[name] = torch.cat(padded)  # [items of all rows, *largest trailing dims]
    return batch


def _pad(t: torch.Tensor, widths: list[int], value: int) -> torch.Tensor:
    return F.pad(t, widths, value=value) if any(widths) else t


def _widths(t: torch.Tensor, trailing: list[int], left: int | None = None) -> list[int]:
    """F.pad widths growing dims 1.. of `t` to `trailing` at their end, except dim 1 to `left`
    at its start where given. F.pad takes (last dim left, last dim right, previous dim ...)."""
    widths = []
    for d in reversed(range(1, t.dim())):
        grow = (left if d == 1 and left is not None else trailing[d - 1]) - t.shape[d]
        widths += (grow, 0) if d == 1 and left is not None else (0, grow)
    return widths


def forward_inputs(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs the model's forward names as parameters, without training-only ones (labels)."""
    params = inspect.signature(model.forward).parameters
    return {k: v for k, v in inputs.items() if k in params and k not in TRAINING_ONLY}
