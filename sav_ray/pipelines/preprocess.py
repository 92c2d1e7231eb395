"""Stage: manifest rows -> ready model inputs, in Ray Data CPU tasks ahead of the model actors.

`preprocess_rows` runs as Ray Data tasks: plain tasks, not an actor pool, so Ray Data scales
them with the free CPUs and reuses its warm worker processes, each of which loads the processor
once (`model_processor` is cached per process; processor files only, never weights). It turns
each row of the normalised manifest (`row`, `id`, `images`, `video`, `text`, `label`) into its
model inputs: its images read and decoded (`sav_ray.core.images.load_image`, the one loader), its
video's frames sampled uniformly and decoded (`sav_ray.core.video.load_video`: `video_frames` of the
preprocessing config, given as native video or as images per its `video_input`), the prompt
rendered, tokens and pixels made by the processor with the preprocessing config's
resolution, ONE row at a time (no padding: `sav_ray.core.model_inputs.encode_row`). The model actor
then only collates (pads), moves to its device, runs the forward pass and captures.

Each row's inputs travel as one binary column, `inputs`: a safetensors blob of tensor name ->
tensor. Chosen over Ray tensor columns because the set of tensors and their ranks differ by
architecture (Qwen's `[patches, dim]` pixel_values and `image_grid_thw`, LLaVA-OneVision's
`[1, tiles, 3, H, W]` and `image_sizes`, Gemma3's `token_type_ids`, ...) and, within one
architecture, by row (text-only rows have no pixels): one column with a self-describing,
pickle-free format carries them all, keeps dtypes exactly, and costs a ~100-byte header per row.
A missing or unreadable image or video stops the job with a message naming the row and file.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from sav_ray.core.images import ImageError, load_image
from sav_ray.core.manifest import ManifestError
from sav_ray.core.model_inputs import encode_row, row_from_bytes, row_to_bytes, video_input
from sav_ray.core.prompts import Example, PromptConfig
from sav_ray.core.resolution import Preprocessing, resolution_plan, warn_unused
from sav_ray.core.video import VideoError, load_video

INPUTS = "inputs"  # the column of per-row safetensors blobs


def object_column(values: list) -> np.ndarray:
    """A 1-d object array whose items are `values` (numpy would otherwise stack equal shapes)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


@functools.lru_cache(maxsize=4)
def model_processor(model: str, revision: str | None) -> Any:
    """The processor of a model (hub id + revision, or local folder): processor files only.
    Cached, so a worker process loads it once however many batches it preprocesses."""
    from sav_ray.core.processors import load_processor

    return load_processor(model, None if Path(model).is_dir() else revision)


def preprocessing_applied(model: str, revision: str | None, prep: Preprocessing) -> dict[str, Any]:
    """What the model's processor makes of `prep` (for the artifact); a warning line for each
    limit it does not take."""
    plan = resolution_plan(model_processor(model, revision), prep)
    warn_unused(plan)
    return plan.applied


def with_video_input(model: str, revision: str | None, prep: Preprocessing) -> Preprocessing:
    """`prep` with how the model's processor takes videos decided (for the artifact)."""
    return replace(prep, video_input=video_input(model_processor(model, revision), prep))


def inputs_column(variant: int) -> str:
    """The column of a row's model inputs for the `variant`-th (prompt, preprocessing) pair."""
    return INPUTS if variant == 0 else f"{INPUTS}_{variant}"


def preprocess_rows(
    batch: dict[str, np.ndarray],
    model: str,
    revision: str | None,
    prompt: dict[str, Any],
    preprocessing: dict[str, Any],
    more_inputs: list[tuple[dict[str, Any], dict[str, Any]]] = (),
) -> dict[str, np.ndarray]:
    """Ray Data stage (`map_batches(preprocess_rows, fn_kwargs=...)`): manifest columns in, the
    same columns with `images`, `video` and `text` replaced by `inputs` out. `more_inputs`:
    further (prompt, preprocessing) pairs (artifacts predicted together whose prompts differ),
    each encoded into its own column (`inputs_column(1)`, ...) from the same decoded images."""
    processor = model_processor(model, revision)
    variants = [
        (PromptConfig.from_dict(p), Preprocessing.from_dict(q))
        for p, q in [(prompt, preprocessing), *more_inputs]
    ]
    blobs: list[list[bytes]] = [[] for _ in variants]  # [variant][row]
    for row, paths, video, text in zip(
        batch["row"], batch["images"], batch["video"], batch["text"], strict=True
    ):
        try:
            images = [load_image(p) for p in paths]
            frames = {
                n: load_video(video, n) if video else []
                for n in {prep.video_frames for _, prep in variants}
            }
        except (ImageError, VideoError) as e:
            raise ManifestError(f"row {row}: {e}") from None
        for out, (config, prep) in zip(blobs, variants, strict=True):
            example = Example(
                text=str(text), images=images, where=f"row {row}", video=frames[prep.video_frames]
            )
            out.append(row_to_bytes(encode_row(processor, example, config, prep)))
    kept = {k: v for k, v in batch.items() if k not in ("images", "video", "text")}
    return {
        **kept,
        **{inputs_column(v): object_column(column) for v, column in enumerate(blobs)},
    }


def rows_of(batch: dict[str, np.ndarray], variant: int = 0) -> list[dict[str, Any]]:
    """The model inputs of a preprocessed batch, one dict of tensors per row."""
    return [row_from_bytes(blob) for blob in batch[inputs_column(variant)]]
