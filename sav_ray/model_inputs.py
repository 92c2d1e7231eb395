"""Model inputs: one example -> its processor output (one row, unpadded) -> a padded batch.

The processor (chat template, tokenisation, image resize and normalisation) runs on ONE row at a
time (`encode_row`), wherever is convenient: Ray Data CPU tasks for the jobs, in-process for the
MLflow model and the server. `collate` then builds the batch the processor itself would have
produced for those rows with left padding, so the model (and the vectors) cannot tell the
difference; tests check every key against the batched processor output for every tiny
architecture. The rules come from the tensors, not from a table per model:
- sequence tensors (a per-row shape equal to `input_ids`'s, `[1, seq]`: input_ids,
  attention_mask, token_type_ids, mm_token_type_ids, ...) are left-padded to the longest row,
  with the tokenizer's pad id for input_ids and 0 otherwise (0 is "padding" in the masks);
- every other tensor (pixel_values, image_grid_thw, image_sizes, batch_num_images, ...) is
  per image or per image row: concatenated on dim 0, trailing dims zero-padded to the largest
  (LLaVA-OneVision pads its tile dim so). Rows without images simply have none.

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

from sav_ray.prompts import Example, PromptConfig, render
from sav_ray.resolution import NO_LIMITS, Preprocessing, limit_area, resolution_plan

# Inputs a processor may return that a forward pass for inference must not get.
TRAINING_ONLY = frozenset({"labels"})


def encode_row(
    processor: Any,
    example: Example,
    prompt: PromptConfig,
    preprocessing: Preprocessing = NO_LIMITS,
) -> dict[str, torch.Tensor]:
    """The processor's output for one example: tensor name -> tensor (`[1, seq]` for tokens)."""
    text = render(processor, example, prompt)
    if not example.images:
        out = processor(text=[text], return_tensors="pt")
    else:
        plan = resolution_plan(processor, preprocessing)
        images = limit_area(example.images, plan.max_image_area)
        out = processor(text=[text], images=[images], return_tensors="pt", **plan.call_kwargs)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


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
        # a token sequence has each row's input_ids shape, [1, seq]
        if all(r[name].shape == r["input_ids"].shape for r in rows if name in r):
            if len(present) != len(rows):
                raise ValueError(f"collate: {name!r} is a token sequence but some rows lack it")
            value = pad_token_id if name == "input_ids" else 0
            batch[name] = torch.cat(
                [F.pad(t, (seq - t.shape[1], 0), value=value) for t in present]
            )  # [batch, seq]
            continue
        trailing = [max(t.shape[d] for t in present) for d in range(1, present[0].dim())]
        padded = []
        for t in present:
            # F.pad takes (last dim left, last dim right, previous dim left, ...)
            widths = [
                w for d in reversed(range(1, t.dim())) for w in (0, trailing[d - 1] - t.shape[d])
            ]
            padded.append(F.pad(t, widths) if any(widths) else t)
        batch[name] = torch.cat(padded)  # [items of all rows, *largest trailing dims]
    return batch


def forward_inputs(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs the model's forward names as parameters, without training-only ones (labels)."""
    params = inspect.signature(model.forward).parameters
    return {k: v for k, v in inputs.items() if k in params and k not in TRAINING_ONLY}
