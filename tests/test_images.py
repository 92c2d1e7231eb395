"""Tests for sav_ray.core.images: formats and modes to RGB, and every refusal naming its image."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from sav_ray.core import images
from sav_ray.core.images import (
    ImageError,
    ImageLimits,
    ImageTooLarge,
    array_to_image,
    decode_image,
    image_to_array,
    load_image,
)

PIXELS = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3)  # [height, width, 3]


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_png_loads_to_the_same_rgb_pixels(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(Image.fromarray(PIXELS), "PNG"))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (10, 12)
    np.testing.assert_array_equal(image_to_array(img), PIXELS)


def test_jpeg_loads_to_rgb_close_to_the_original(tmp_path):
    flat = np.full((16, 24, 3), (200, 40, 90), dtype=np.uint8)
    path = tmp_path / "a.jpg"
    path.write_bytes(encode(Image.fromarray(flat), "JPEG", quality=95))
    a = image_to_array(load_image(path))
    assert a.shape == (16, 24, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - flat).max() <= 4


def test_rgba_transparent_areas_become_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque
    rgba[1, 1] = (10, 20, 30, 0)  # transparent
    a = image_to_array(decode_image(encode(Image.fromarray(rgba), "PNG")))
    assert a[0, 0].tolist() == [10, 20, 30]
    assert a[1, 1].tolist() == [255, 255, 255]


def test_palette_and_grey_load_to_rgb():
    palette = Image.fromarray(PIXELS).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    img = decode_image(encode(palette, "PNG"))
    assert img.mode == "RGB"
    np.testing.assert_array_equal(image_to_array(img), np.asarray(palette.convert("RGB")))

    grey = decode_image(encode(Image.new("L", (3, 2), 77), "PNG"))
    assert image_to_array(grey).tolist() == [[[77, 77, 77]] * 3] * 2


def test_cmyk_jpeg_loads_to_rgb():
    img = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    red = image_to_array(img)[4, 4].astype(int)
    assert img.mode == "RGB" and red[0] > 200 and red[1] < 50 and red[2] < 50


def test_16_bit_grey_is_scaled_not_clipped():
    deep = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    a = image_to_array(decode_image(encode(deep, "PNG")))
    assert a[0, :, 0].tolist() == [0, 128, 255]


def float_scaled(levels: np.ndarray) -> np.ndarray:
    """The float scaling `decode_image` used to do, as [height, width, 3] uint8: the reference
    its integer scaling must match exactly."""
    grey = np.clip(np.rint(levels.astype(np.float64) / 257), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def float_to_rgb(img: Image.Image) -> Image.Image:
    """`_to_rgb` for greyscale before the change: whole-image float64 copies."""
    levels = np.asarray(img, dtype=np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8)).convert("RGB")


@pytest.mark.parametrize("strip_pixels", [None, 1000, 1])
@pytest.mark.parametrize(
    ("fmt", "dtype", "mode"), [("PNG", "<u2", "I;16"), ("TIFF", ">u2", "I;16B")]
)
def test_16_bit_grey_scaling_equals_float_rounding(monkeypatch, strip_pixels, fmt, dtype, mode):
    if strip_pixels is not None:  # several strips, the last one short
        monkeypatch.setattr(images, "_STRIP_PIXELS", strip_pixels)
    rng = np.random.default_rng(0)
    k = np.arange(255)
    # Values next to a rounding boundary (v / 257 = k + 0.498 and k + 0.502), the extremes,
    # then random values; and every 16-bit value once, in random order.
    edges = np.concatenate([[0, 65535], 257 * k + 128, 257 * k + 129])
    noisy = rng.integers(0, 65536, size=(37, 53)).ravel()
    noisy[: len(edges)] = edges
    every = rng.permutation(65536)
    for levels in (noisy.reshape(37, 53), every.reshape(256, 256)):
        data = encode(Image.fromarray(levels.astype(dtype)), fmt)
        assert Image.open(io.BytesIO(data)).mode == mode
        np.testing.assert_array_equal(image_to_array(decode_image(data)), float_scaled(levels))


def test_32_bit_grey_is_clipped_then_scaled():
    rng = np.random.default_rng(1)
    levels = rng.integers(-(2**31), 2**31, size=(41, 29)).astype(np.int32)
    levels[0, :8] = [-(2**31), -1, 0, 128, 129, 65535, 65536, 2**31 - 1]
    levels[1:21] = rng.integers(-300, 65836, size=(20, 29))  # mostly in range
    img = Image.fromarray(levels, mode="I")
    np.testing.assert_array_equal(image_to_array(img), float_scaled(levels))
    data = encode(img, "TIFF")  # PNG cannot store 32-bit greyscale
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(image_to_array(decode_image(data)), float_scaled(levels))
    assert image_to_array(img)[0, :8, 0].tolist() == [0, 0, 0, 0, 1, 255, 255, 255]


def test_16_bit_grey_decoding_memory_is_bounded(monkeypatch):
    """Peak traced memory of decoding a 3000x3000 16-bit PNG stays under 2 bytes a pixel: the
    8-bit result (1 byte a pixel) plus strips. tracemalloc sees numpy arrays and Python objects
    (such as `tobytes` copies), not Pillow's own image buffers (the decoded 16-bit image, the
    RGB result), which are needed whichever way the pixels are scaled. The old float64 path
    peaked at about 24 bytes a pixel."""
    side = 3000
    y, x = np.mgrid[0:side, 0:side]
    data = encode(Image.fromarray(((x * 21 + y * 5) % 65536).astype(np.uint16)), "PNG")
    del x, y
    bound = 2 * side * side

    def peak(decode) -> tuple[int, Image.Image]:
        tracemalloc.start()
        try:
            img = decode(data)
            return tracemalloc.get_traced_memory()[1], img
        finally:
            tracemalloc.stop()

    new_peak, new = peak(decode_image)
    with monkeypatch.context() as m:
        m.setattr(images, "_to_rgb", float_to_rgb)
        old_peak, old = peak(decode_image)
    assert new_peak < bound, f"{new_peak / 1e6:.1f} MB traced, bound {bound / 1e6:.1f} MB"
    assert old_peak > 4 * bound, "the float path no longer shows what the bound is for"
    assert new.mode == "RGB" and np.array_equal(np.asarray(new), np.asarray(old))


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.new("RGB", (30, 10), (0, 0, 255)), "JPEG", exif=exif)
    assert decode_image(data).size == (10, 30)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"image file .*nope\.png: not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match=r"image file .*: not a file"):
        load_image(tmp_path)


def test_bytes_that_are_not_an_image_name_the_file_or_field(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(ImageError, match=r"image file .*notes\.png: not an image"):
        load_image(path)
    with pytest.raises(ImageError, match=r"inputs\[0\]\.images\[1\]: not an image"):
        decode_image(b"hello", what="inputs[0].images[1]")
    with pytest.raises(ImageError, match=r"inputs\[2\]: empty \(0 bytes\)"):
        decode_image(b"", what="inputs[2]")


def test_formats_outside_the_list_are_refused():
    with pytest.raises(ImageError, match=r"x: not an image, or not in a supported format"):
        decode_image(encode(Image.new("RGB", (4, 4)), "PPM"), what="x")


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"image file .*cut\.png: cannot be decoded.*truncated"):
        load_image(path)


def test_too_many_pixels_is_refused_before_decoding():
    # A 5000 x 5000 blank PNG compresses to a few kB: a small decompression bomb.
    data = encode(Image.new("L", (5000, 5000)), "PNG")
    assert len(data) < 100_000
    with pytest.raises(
        ImageTooLarge, match=r"upload: 5000x5000 is 25000000 pixels, over the limit"
    ):
        decode_image(data, ImageLimits(max_pixels=1_000_000), what="upload")


def test_pillow_decompression_bomb_error_becomes_image_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(Image.new("L", (100, 100)), "PNG")
    with pytest.raises(ImageTooLarge, match=r"bomb\.png: too many pixels for Pillow's"):
        decode_image(data, what="bomb.png")


def test_too_many_bytes(tmp_path):
    data = encode(Image.fromarray(PIXELS), "PNG")
    limits = ImageLimits(max_bytes=len(data) - 1)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ImageTooLarge, match=rf"big\.png: {len(data)} bytes, over the limit"):
        load_image(path, limits)
    with pytest.raises(ImageTooLarge, match=r"field: .* bytes, over the limit"):
        decode_image(data, limits, what="field")
    assert load_image(path, ImageLimits(max_bytes=len(data))).size == (10, 12)


def test_array_round_trip_and_shape_check():
    img = array_to_image(PIXELS)
    assert img.mode == "RGB" and img.size == (10, 12)
    np.testing.assert_array_equal(image_to_array(img), PIXELS)
    with pytest.raises(ImageError, match=r"\[height, width, 3\] uint8 array, got \[12, 10\]"):
        array_to_image(PIXELS[..., 0])
    with pytest.raises(ImageError, match=r"got \[12, 10, 3\] float32"):
        array_to_image(PIXELS.astype(np.float32))
