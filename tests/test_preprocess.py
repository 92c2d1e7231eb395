"""Preprocessing in Ray Data CPU tasks, the collate function, and image resolution limits.

One Ray start for the module; a handful of rows per architecture, with images of different
sizes (and a text-only and a two-image row) in one batch, so token and patch padding happen.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sav_ray.core import reduce
from sav_ray.core.artifact import load_artifact, write_artifact
from sav_ray.core.capture import capture_examples, capture_rows
from sav_ray.core.classify import (
    head_vectors,
    needed_layers,
    predict_examples,
    predict_rows,
    predictions,
)
from sav_ray.core.model_inputs import TRAINING_ONLY, collate, encode_row, forward_inputs
from sav_ray.core.prompts import Example, PromptConfig, encode
from sav_ray.core.resolution import Preprocessing, resolution_plan
from sav_ray.fixtures.tiny import ARCHITECTURES
from sav_ray.pipelines.config import FitConfig, ModelConfig

PROMPT = PromptConfig()
# (image sizes as (width, height), text, label): one batch of all four rows
ROWS = [
    ([(40, 30)], "what is it", "a"),
    ([(120, 60)], "a longer question here about the picture", "b"),
    ([], "text only", "a"),
    ([(50, 50), (90, 40)], "two", "b"),
]
LIMIT = 28 * 28  # one Qwen image token: every test image is over it


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("preprocess_data")
    rng = np.random.default_rng(0)
    lines = []
    for i, (sizes, text, label) in enumerate(ROWS):
        paths = []
        for j, (w, h) in enumerate(sizes):
            path = folder / f"{i}_{j}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            paths.append(path.name)
        lines.append(json.dumps({"image": paths, "question": text, "label": label}))
    path = folder / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _table(path):
    from sav_ray.core.manifest import read_manifest

    return read_manifest(path)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_collate_equals_the_batched_processor(arch, tiny_model, manifest, manifest_examples):
    processor = tiny_model(arch).processor
    examples, _ = manifest_examples(manifest)
    expected = encode(processor, examples, PROMPT)
    rows = [encode_row(processor, ex, PROMPT) for ex in examples]
    got = collate(rows, processor.tokenizer.pad_token_id)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def test_forward_inputs_drop_what_the_forward_does_not_take(tiny_model):
    model = tiny_model("qwen2_vl").model
    inputs = {"input_ids": 1, "attention_mask": 2, "labels": 3, "not_a_parameter": 4}
    assert set(forward_inputs(model, inputs)) == {"input_ids", "attention_mask"}
    assert "labels" in TRAINING_ONLY


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_vectors_preprocessed_on_ray_equal_one_process(
    arch, local_ray, tiny_model_dir, tiny_model, manifest, manifest_examples
):
    from sav_ray.pipelines.fitting import vectors_dataset

    model = ModelConfig(model=str(tiny_model_dir(arch)), batch_size=len(ROWS))
    ds = vectors_dataset(_table(manifest), model, PROMPT, "float32").materialize()
    got = sorted(ds.take_all(), key=lambda r: r["row"])
    vectors = np.stack([r["vectors"] for r in got])  # [n, layer, head, head_dim]
    examples, _ = manifest_examples(manifest)
    expected = capture_examples(tiny_model(arch), examples, PROMPT)
    np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)
    forward, busy = float(ds.sum("forward_seconds")), float(ds.sum("busy_seconds"))
    assert 0 < forward <= busy  # the actor's forward pass is part of its call


def test_qwen_limits_become_the_processors_size(tiny_model):
    processor = tiny_model("qwen2_vl").processor
    plan = resolution_plan(processor, Preprocessing(max_image_pixels=LIMIT))
    # the tiny processor's own minimum (784) is kept: it does not exceed the limit
    assert plan.call_kwargs == {"size": {"shortest_edge": 784, "longest_edge": LIMIT}}
    assert plan.notes == ()


@pytest.mark.parametrize("arch", ["llava", "gemma3"])
def test_fixed_size_processors_are_untouched_with_a_note(arch, tiny_model, caplog):
    from sav_ray.core.resolution import warn_unused

    processor = tiny_model(arch).processor
    plan = resolution_plan(processor, Preprocessing(max_image_pixels=LIMIT))
    assert plan.call_kwargs == {} and plan.max_image_area is None
    assert plan.applied["notes"] == list(plan.notes) and len(plan.notes) == 1
    warn_unused(plan)
    assert "--max-image-pixels 784 does not apply" in caplog.text


def test_llava_onevision_limit_picks_a_smaller_tile_grid(tiny_model):
    processor = tiny_model("llava_onevision").processor
    example = Example("what", [Image.fromarray(np.zeros((100, 110, 3), np.uint8))])
    default = encode_row(processor, example, PROMPT)
    limited = encode_row(processor, example, PROMPT, Preprocessing(max_image_pixels=56 * 56))
    assert limited["pixel_values"].shape[1] < default["pixel_values"].shape[1]  # tiles
    assert limited["input_ids"].shape[1] < default["input_ids"].shape[1]


def test_visual_tokens_row_applies_the_limit():
    from sav_ray.bench.preprocess import visual_tokens

    row = visual_tokens(max_image_pixels=224 * 224, size=(640, 360))
    assert row.measured["tokens_limited"] < row.measured["tokens_default"]
    assert row.verdict == "pass"


@pytest.mark.slow
def test_fit_records_max_image_pixels_and_predict_reuses_it(
    local_ray, tiny_model_dir, tiny_model, manifest, manifest_examples, tmp_path
):
    from sav_ray.pipelines.fitting import fit, preprocessed_dataset
    from sav_ray.pipelines.preprocess import rows_of

    folder = str(tiny_model_dir("qwen2_vl"))
    lm = tiny_model("qwen2_vl")
    cfg = FitConfig(
        model=folder,
        train=str(manifest),
        output=str(tmp_path / "sav"),
        batch_size=len(ROWS),
        num_heads=4,
        max_image_pixels=LIMIT,
        save_vectors=str(tmp_path / "vectors"),
    ).validate()
    fitted, _ = fit(cfg)
    write_artifact(fitted, tmp_path / "sav")
    artifact = load_artifact(tmp_path / "sav")
    prep = Preprocessing(max_image_pixels=LIMIT, video_input="images")  # no video processor here
    assert artifact.preprocessing == prep
    assert artifact.preprocessing_applied["settings"]["size"]["longest_edge"] == LIMIT
    # a refit from the saved vectors keeps the resolution they were taken at
    refit, _ = fit(FitConfig(from_vectors=cfg.save_vectors, output=cfg.output, num_heads=4))
    assert refit.preprocessing == prep
    assert refit.preprocessing_applied == artifact.preprocessing_applied

    # the fit's centroids are those of a direct capture at that resolution, not the default
    examples, labels = manifest_examples(manifest)
    y = np.array([artifact.labels.index(label) for label in labels])  # [n]
    limited = capture_examples(lm, examples, PROMPT, preprocessing=prep)  # [n, L, H, D]
    default = capture_examples(lm, examples, PROMPT)
    assert not np.allclose(limited, default, atol=1e-3)
    sums = reduce.ClassSums.from_batch(tuple(artifact.labels), limited, y)
    centroids = reduce.gather_heads(sums.centroids(), artifact.heads)  # [class, k, head_dim]
    np.testing.assert_allclose(artifact.centroids, centroids, atol=1e-5, rtol=0)

    # predict's rows (CPU tasks, the artifact's preprocessing) give the limited vectors
    model = ModelConfig(model=folder, batch_size=len(ROWS))
    ds = preprocessed_dataset(_table(manifest), model, artifact.prompt, artifact.preprocessing)
    batch = sorted(ds.take_all(), key=lambda r: r["row"])
    rows = rows_of({"inputs": [r["inputs"] for r in batch]})
    np.testing.assert_allclose(capture_rows(lm, rows).vectors, limited, atol=1e-5, rtol=0)

    # the actors' (and the MLflow model's and server's) votes come from those vectors
    layers = needed_layers(artifact)
    votes = predictions(artifact, head_vectors(limited[:, layers], layers, artifact))
    assert predict_rows(lm, artifact, rows) == votes
    assert predict_examples(lm, artifact, examples) == votes


def test_version_1_artifact_predicts_at_the_processors_default(
    demo_sav, small_data, manifest_examples, tmp_path
):
    lm, folder, artifact = demo_sav
    doc = json.loads((folder / "sav.json").read_text())
    doc["schema_version"] = 1
    for key in ("preprocessing", "calibration", "decision"):  # what version 1 did not have
        del doc[key]
    old = tmp_path / "v1"
    old.mkdir()
    for f in folder.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    (old / "sav.json").write_text(json.dumps(doc))
    v1 = load_artifact(old)
    assert v1.schema_version == 1 and v1.preprocessing == Preprocessing()
    assert v1.calibration is None and v1.decision == "vote"
    examples, _ = manifest_examples(small_data["test"])
    old_preds = [p.to_dict() for p in predict_examples(lm, v1, examples[:4])]
    new_preds = [p.to_dict() for p in predict_examples(lm, artifact, examples[:4])]
    assert all("probabilities" not in p for p in old_preds)  # vote shares only, as before
    for old_p, new_p in zip(old_preds, new_preds, strict=True):
        assert abs(sum(new_p.pop("probabilities").values()) - 1) < 1e-9
        assert old_p == new_p
