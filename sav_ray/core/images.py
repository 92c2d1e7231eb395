"""Image decoding with limits: files or bytes to fully loaded RGB Pillow images.

Fitting (manifest image files) and serving (uploaded bytes) decode through the same function,
so a model sees the same pixels in both. Untrusted input is bounded before it is decoded:
the encoded size (`ImageLimits.max_bytes`) and the pixel count read from the header
(`ImageLimits.max_pixels`), so a small file that expands to a huge image (a decompression
bomb) is refused without being decoded. Only common photo formats are opened (`IMAGE_FORMATS`).
Conversion to 8-bit RGB avoids whole-image float copies (16-bit greyscale is scaled in strips of
rows), so a server decoding several large images at once holds little beyond the images.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats Pillow may open; the others (EPS, which calls Ghostscript, and rarer ones) stay closed.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

# Errors Pillow raises on corrupt or truncated data, besides UnidentifiedImageError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


class ImageError(ValueError):
    """An image cannot be used; the message names the file (or request field) and why."""


class ImageTooLarge(ImageError):
    """The image is over a byte or pixel limit (a server answers 413, not 400)."""


@dataclass(frozen=True)
class ImageLimits:
    """Per-image limits, checked before decoding.

    Pillow's own decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, about 179 million
    pixels for an error) still applies above `max_pixels`; it is reported as an ImageError too.
    """

    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError(f"image limits must be positive, got {self}")


def load_image(path: str | Path, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Read an image file into a fully loaded RGB image (see `decode_image`)."""
    what = f"image file {path}"
    data = read_local_file(
        path, what, lambda size: check_image_bytes(size, limits, what), ImageError
    )
    return decode_image(data, limits, what=what)


def read_local_file(
    path: str | Path, what: str, check_size: Callable[[int], None], error: type[Exception]
) -> bytes:
    """A local file's bytes; `check_size(bytes)` raises before a file over its limit is read.
    Errors are `error`s naming `what`."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise error(f"{what}: not found; check the path") from None
    except OSError as e:
        raise error(f"{what}: cannot be read ({e})") from None
    if not os.path.isfile(path):
        raise error(f"{what}: not a file")
    check_size(size)
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise error(f"{what}: cannot be read ({e})") from None


def decode_image(
    data: bytes, limits: ImageLimits = ImageLimits(), *, what: str = "image"
) -> Image.Image:
    """Decode encoded image bytes into a fully loaded RGB image.

    `what` names the image in error messages (a file, or a request field such as
    "inputs[0].images[1]"). EXIF orientation is applied; transparent areas become white
    (as transformers' `convert_to_rgb` does); 16-bit greyscale is scaled to 8 bits; only the
    first frame of an animation or multi-page file is kept.
    """
    img = _open_checked(data, limits, what)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except _DECODE_ERRORS as e:
        raise ImageError(
            f"{what}: cannot be decoded, the data is truncated or corrupt ({e})"
        ) from None


def image_pixels(data: bytes, limits: ImageLimits = ImageLimits(), *, what: str = "image") -> int:
    """The pixel count of encoded image bytes, from the header alone, with the same checks and
    errors as `decode_image` has before decoding (a server reserves memory by it)."""
    with _open_checked(data, limits, what) as img:
        return img.width * img.height


def _open_checked(data: bytes, limits: ImageLimits, what: str) -> Image.Image:
    """The image opened lazily (header read, pixels not decoded), within the byte and pixel
    limits."""
    if not data:
        raise ImageError(f"{what}: empty (0 bytes); send the encoded image file")
    check_image_bytes(len(data), limits, what)
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(
            f"{what}: too many pixels for Pillow's decompression-bomb limit ({e})"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{what}: not an image, or not in a supported format ({', '.join(IMAGE_FORMATS)})"
        ) from None
    except _DECODE_ERRORS as e:
        raise ImageError(f"{what}: corrupt image header ({e})") from None
    width, height = img.size
    if width * height > limits.max_pixels:
        img.close()
        raise ImageTooLarge(
            f"{what}: {width}x{height} is {width * height} pixels, over the limit of "
            f"{limits.max_pixels} pixels per image; resize the image"
        )
    return img


def check_image_bytes(size: int, limits: ImageLimits, what: str) -> None:
    """ImageTooLarge naming `what` when an encoded image of `size` bytes is over the limit."""
    if size > limits.max_bytes:
        raise ImageTooLarge(
            f"{what}: {size} bytes, over the limit of {limits.max_bytes} bytes per image; "
            "compress or resize the image"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I"):
        # Pillow's own conversion clips 16-bit values at 255 (a white image); scale instead.
        img = _scale_to_8_bits(img)
    return img.convert("RGB")


# Pixels per strip in `_scale_to_8_bits`: about 1 MB per int32 temporary, whatever the image size.
_STRIP_PIXELS = 2**18


def _scale_to_8_bits(img: Image.Image) -> Image.Image:
    """An "I" or "I;16*" image as "L": each value v becomes rint(clip(v, 0, 65535) / 257).

    Works on strips of rows: a float64 copy of the whole image (8 bytes a pixel, several
    times over) made a 4000x4000 image cost hundreds of MB, per concurrent request.
    """
    width, height = img.size
    levels = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        strip = np.array(img.crop((0, top, width, bottom)), dtype=np.int32)  # [rows, width]
        np.clip(strip, 0, 65535, out=strip)
        # Integer rounding equals the float rint(v / 257): v / 257 is never halfway between
        # two integers (257 is odd), so there is no tie for the two to break differently.
        strip += 128
        strip //= 257
        levels[top:bottom] = strip
    return Image.fromarray(levels)


def image_to_array(img: Image.Image) -> np.ndarray:
    """An image's RGB pixels, [height, width, 3] uint8."""
    return np.array(_to_rgb(img), dtype=np.uint8)  # [height, width, 3]


def array_to_image(a: np.ndarray) -> Image.Image:
    """An RGB image from [height, width, 3] uint8 pixels."""
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ImageError(
            f"pixels must be a [height, width, 3] uint8 array, got {list(a.shape)} {a.dtype}"
        )
    return Image.fromarray(np.ascontiguousarray(a))
