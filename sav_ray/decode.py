"""Stage: read and decode each row's images (CPU tasks, ahead of the model actors).

A batch is a dict of numpy columns from the normalised manifest (`row`, `id`, `images`,
`text`, `label`); the stage adds, per row, its images' raw RGB bytes (`pixels`) and their
`[height, width]` (`pixel_shapes`): plain Arrow lists, so blocks travel without pickling.
`examples_of` turns such a batch back into `Example`s inside the model actors. A missing or
unreadable image stops the job with a message naming the row and file.
"""

from __future__ import annotations

import numpy as np

from sav_ray.images import ImageError, array_to_image, image_to_array, load_image
from sav_ray.manifest import ManifestError
from sav_ray.prompts import Example


def object_column(values: list) -> np.ndarray:
    """A 1-d object array whose items are `values` (numpy would otherwise stack equal shapes)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def decode_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add `pixels` (per row, each image's RGB bytes, in order) and `pixel_shapes`."""
    pixels, shapes = [], []
    for row, paths in zip(batch["row"], batch["images"], strict=True):
        try:
            arrays = [image_to_array(load_image(p)) for p in paths]  # [height, width, 3] each
        except ImageError as e:
            raise ManifestError(f"row {row}: {e}") from None
        pixels.append([a.tobytes() for a in arrays])
        shapes.append([list(a.shape[:2]) for a in arrays])
    columns = {k: v for k, v in batch.items() if k != "images"}  # paths are not needed past here
    return {**columns, "pixels": object_column(pixels), "pixel_shapes": object_column(shapes)}


def examples_of(batch: dict[str, np.ndarray]) -> list[Example]:
    """The decoded rows of a batch as `Example`s (text and RGB images, named by row)."""
    examples = []
    for row, text, pixels, shapes in zip(
        batch["row"], batch["text"], batch["pixels"], batch["pixel_shapes"], strict=True
    ):
        images = [
            array_to_image(np.frombuffer(data, np.uint8).reshape(int(h), int(w), 3))
            for data, (h, w) in zip(pixels, shapes, strict=True)
        ]
        examples.append(Example(text=str(text), images=images, where=f"row {row}"))
    return examples
