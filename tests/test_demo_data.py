"""Tests for sav_ray.fixtures.demo_data: deterministic, balanced, readable, and separable by colour."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sav_ray.core.images import image_to_array, load_image
from sav_ray.core.manifest import check_image_files, class_counts, read_manifest, validate_for_fit
from sav_ray.fixtures.demo_data import DEMO_CLASSES, make_dataset


def file_bytes(out_dir):
    return {
        p.relative_to(out_dir): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes_and_other_seed_other_images(tmp_path):
    a = file_bytes(
        make_dataset(tmp_path / "a", train_per_class=3, test_per_class=2)["train"].parent
    )
    b = file_bytes(
        make_dataset(tmp_path / "b", train_per_class=3, test_per_class=2)["train"].parent
    )
    c = file_bytes(
        make_dataset(tmp_path / "c", train_per_class=3, test_per_class=2, seed=1)["train"].parent
    )
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.suffix == ".png"]
    assert len(images) == 15
    assert all(a[k] != c[k] for k in images)


def test_manifests_are_balanced_readable_and_complete(tmp_path):
    start = time.perf_counter()
    paths = make_dataset(tmp_path, classes=3, train_per_class=20, test_per_class=10)
    assert time.perf_counter() - start < 2.0
    for split, per_class in (("train", 20), ("test", 10)):
        assert paths[split] == tmp_path / f"{split}.jsonl"
        table = read_manifest(paths[split])
        check_image_files(table)
        assert class_counts(table) == {label: per_class for label in DEMO_CLASSES[:3]}
        assert validate_for_fit(table, "loo") == tuple(sorted(DEMO_CLASSES[:3]))
        assert set(table["text"].to_pylist()) == {"What is in the image?"}
        assert all(len(images) == 1 for images in table["images"].to_pylist())
    assert '"image": "images/train/' in paths["train"].read_text()


def test_all_classes_images_differ_and_dominant_colour_separates_them(tmp_path):
    paths = make_dataset(
        tmp_path, classes=len(DEMO_CLASSES), train_per_class=4, test_per_class=1, size=40
    )
    table = read_manifest(paths["train"])
    arrays = [image_to_array(load_image(p)) for (p,) in table["images"].to_pylist()]
    assert all(a.shape == (40, 40, 3) for a in arrays)
    assert len({a.tobytes() for a in arrays}) == len(arrays)

    # The most saturated pixels carry the shape's colour: their mean is nearest its own class.
    def shape_colour(a):
        a = a.reshape(-1, 3).astype(float)  # [pixels, 3]
        saturation = a.max(axis=1) - a.min(axis=1)
        return a[saturation >= np.quantile(saturation, 0.9)].mean(axis=0)

    colours = np.array([shape_colour(a) for a in arrays])  # [rows, 3]
    labels = np.array(table["label"].to_pylist())
    centroids = np.array([colours[labels == c].mean(axis=0) for c in DEMO_CLASSES])
    nearest = np.argmin(((colours[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert [DEMO_CLASSES[i] for i in nearest] == labels.tolist()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="classes must be between 2 and 6"):
        make_dataset(tmp_path, classes=7)
    with pytest.raises(ValueError, match="at least 1"):
        make_dataset(tmp_path, test_per_class=0)
