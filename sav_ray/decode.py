"""Stage: read and decode each row's images (CPU tasks, ahead of the model actors).

A batch is a dict of numpy columns from the normalised manifest (`row`, `id`, `images`,
`text`, `label`); the stage adds `pixels`, one list of `[height, width, 3]` uint8 arrays per
row. A missing or unreadable image stops the job with a message naming the row and file.
"""

from __future__ import annotations

import numpy as np

from sav_ray.images import ImageError, image_to_array, load_image
from sav_ray.manifest import ManifestError


def object_column(values: list) -> np.ndarray:
    """A 1-d object array whose items are `values` (numpy would otherwise stack equal shapes)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def decode_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add `pixels`: per row, its images as `[height, width, 3]` uint8 arrays, in order."""
    pixels = []
    for row, paths in zip(batch["row"], batch["images"], strict=True):
        try:
            pixels.append([image_to_array(load_image(p)) for p in paths])
        except ImageError as e:
            raise ManifestError(f"row {row}: {e}") from None
    columns = {k: v for k, v in batch.items() if k != "images"}  # paths are not needed past here
    return {**columns, "pixels": object_column(pixels)}
