"""A generated image classification data set (coloured shapes) for the demo and the tests.

Each class is one coloured shape ("red_circle", "green_square", ...) drawn at a random
position and size, with a jittered colour, on a noisy grey background: the classes differ in
dominant colour and shape, and no two images are alike. Generation is deterministic given
the seed.

    python -m sav_ray.demo_data data/demo --classes 3

writes data/demo/images/{train,test}/*.png and the manifests data/demo/train.jsonl and
data/demo/test.jsonl, whose rows hold `image` (a path relative to the manifest), `question`
and `label`.

`make_text_dataset` (`--text`) writes a text-only set for text LLM base models instead: rows
with `question` and `label` only, a short sentence about an animal or a vehicle.

A generated video data set: `make_video_dataset` (`--videos`) writes short GIFs of a square
moving left or right (`VIDEO_CLASSES`), wrapping around the edges from a uniformly random
start, so no single frame tells the classes apart: only the order of the frames does. Its
manifests' rows hold `video`, `question` and `label` (no image field: fit them with
`--image-field ""`).

    python -m sav_ray.demo_data data/demo-video --videos
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (label, RGB colour, shape)
_CLASSES = (
    ("red_circle", (215, 45, 45), "circle"),
    ("green_square", (45, 185, 60), "square"),
    ("blue_triangle", (50, 80, 220), "triangle"),
    ("yellow_cross", (230, 210, 40), "cross"),
    ("magenta_ring", (200, 50, 200), "ring"),
    ("cyan_bar", (40, 200, 210), "bar"),
)
DEMO_CLASSES = tuple(label for label, _, _ in _CLASSES)
VIDEO_CLASSES = ("moves_left", "moves_right")
_VIDEO_BACKGROUND, _VIDEO_SQUARE = (120, 120, 120), (240, 200, 40)


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=255)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
    elif shape == "ring":
        draw.ellipse(box, outline=255, width=max(2, round(r / 2.5)))
    else:
        assert shape == "bar", shape
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=255)
    return mask


def _draw(
    rng: np.random.Generator, colour: tuple[int, int, int], shape: str, size: int
) -> Image.Image:
    grey = rng.integers(95, 145) + rng.integers(-10, 11, size=3)  # [3]
    background = grey + rng.normal(0.0, 18.0, size=(size, size, 3))  # [height, width, 3]
    r = rng.uniform(0.3, 0.42) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    mask = np.asarray(_shape_mask(shape, size, cx, cy, r), dtype=np.float64)[..., None] / 255.0
    jittered = np.asarray(colour) + rng.integers(-35, 36, size=3)  # [3]
    shape_pixels = jittered + rng.normal(0.0, 12.0, size=(size, size, 3))  # [height, width, 3]
    pixels = mask * shape_pixels + (1.0 - mask) * background
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def make_dataset(
    out_dir: str | Path,
    *,
    classes: int = 3,
    train_per_class: int = 20,
    test_per_class: int = 10,
    size: int = 56,
    seed: int = 0,
    question: str = "What is in the image?",
) -> dict[str, Path]:
    """Write the images and the train/test manifests; return {"train": path, "test": path}.

    The first `classes` of `DEMO_CLASSES` are used; manifest rows go round the classes in turn.
    """
    if not 2 <= classes <= len(_CLASSES):
        raise ValueError(f"classes must be between 2 and {len(_CLASSES)}, got {classes}")
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError("train_per_class and test_per_class must be at least 1")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    manifests = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(per_class):
            for label, colour, shape in _CLASSES[:classes]:
                relative = f"images/{split}/{label}_{i:03d}.png"
                _draw(rng, colour, shape, size).save(out_dir / relative)
                rows.append({"image": relative, "question": question, "label": label})
        manifests[split] = out_dir / f"{split}.jsonl"
        manifests[split].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifests


# label -> the words only its sentences use; the filler words are shared by both classes
_TEXT_CLASSES = {"animal": ("cat", "dog", "bird"), "vehicle": ("car", "boat", "road")}
_FILLER = "the a small large red green blue black white left right in on of and is".split()


def make_text_dataset(
    out_dir: str | Path, *, train_per_class: int = 20, test_per_class: int = 10, seed: int = 0
) -> dict[str, Path]:
    """Write text-only train/test manifests (`question`, `label`; no image field); return
    {"train": path, "test": path}. Each sentence mixes filler words with one or two words of
    its class."""
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError("train_per_class and test_per_class must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifests = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        rows = []
        for _ in range(per_class):
            for label, own in _TEXT_CLASSES.items():
                words = list(rng.choice(_FILLER, size=rng.integers(3, 8)))
                for word in rng.choice(own, size=rng.integers(1, 3)):
                    words.insert(int(rng.integers(len(words) + 1)), str(word))
                rows.append({"question": " ".join(words).capitalize() + ".", "label": label})
        manifests[split] = out_dir / f"{split}.jsonl"
        manifests[split].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifests


def _moving_square(rng: np.random.Generator, label: str, frames: int, size: int) -> list:
    """Frames of a square moving one way, wrapping around the edges: its start is uniform over
    the frame, so every frame alone is a square at a uniformly random place in either class."""
    side = size // 4
    step = max(1, size // (2 * frames))  # under half the width in all: the direction is clear
    canvas = np.full((size, size, 3), _VIDEO_BACKGROUND, dtype=np.uint8)  # [height, width, 3]
    y = int(rng.integers(0, size - side + 1))
    canvas[y : y + side, :side] = _VIDEO_SQUARE
    x0 = int(rng.integers(0, size))
    sign = -1 if label == "moves_left" else 1
    return [Image.fromarray(np.roll(canvas, x0 + sign * step * t, axis=1)) for t in range(frames)]


def write_gif(frames: list, path: str | Path, frame_ms: int = 100) -> None:
    """An animated GIF of RGB frames (lossless for images of few colours)."""
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)


def make_video_dataset(
    out_dir: str | Path,
    *,
    train_per_class: int = 4,
    test_per_class: int = 2,
    frames: int = 6,
    size: int = 32,
    seed: int = 0,
    question: str = "Which way does the square move?",
) -> dict[str, Path]:
    """Write the GIFs and the train/test manifests; return {"train": path, "test": path}.
    Rows go round `VIDEO_CLASSES` in turn."""
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError("train_per_class and test_per_class must be at least 1")
    if frames < 2 or size < 16:
        raise ValueError(f"need at least 2 frames and 16 pixels, got {frames} and {size}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    manifests = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        (out_dir / "videos" / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(per_class):
            for label in VIDEO_CLASSES:
                relative = f"videos/{split}/{label}_{i:03d}.gif"
                write_gif(_moving_square(rng, label, frames, size), out_dir / relative)
                rows.append({"video": relative, "question": question, "label": label})
        manifests[split] = out_dir / f"{split}.jsonl"
        manifests[split].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--seed", type=int, default=0)
    sets = parser.add_mutually_exclusive_group()
    sets.add_argument("--text", action="store_true", help="a text-only set (text LLMs)")
    sets.add_argument(
        "--videos", action="store_true", help="the moving-square video set instead of images"
    )
    args = parser.parse_args()
    if args.text or args.videos:
        paths = (make_text_dataset if args.text else make_video_dataset)(
            args.out_dir,
            train_per_class=args.train_per_class,
            test_per_class=args.test_per_class,
            seed=args.seed,
        )
        print(f"train: {paths['train']}\ntest:  {paths['test']}")
        return
    paths = make_dataset(
        args.out_dir,
        classes=args.classes,
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
        size=args.size,
        seed=args.seed,
    )
    print(f"train: {paths['train']}\ntest:  {paths['test']}")


if __name__ == "__main__":
    main()
