"""Tests for sav_ray.serving.requests, the server's core without Ray: image sources and limits, model
references, batches where one input fails alone, and the layer counter behind early exit."""

from __future__ import annotations

import base64
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sav_ray.core.artifact import SavArtifact, Selection, write_artifact
from sav_ray.core.capture import LayerCounter
from sav_ray.core.classify import predict_examples
from sav_ray.core.images import image_to_array
from sav_ray.core.prompts import Example, PromptConfig
from sav_ray.serving.requests import (
    BatchStats,
    ImageSources,
    RequestError,
    RequestLimits,
    classify_shared,
    encode_example,
    image_bytes,
    resolve_ref,
    split_model_id,
    to_examples,
)

LIMITS = RequestLimits(max_image_bytes=4000, max_image_pixels=10_000, max_request_pixels=25_000)
PIXELS = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)


def png(pixels: np.ndarray = PIXELS) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def status_of(call) -> tuple[int, str]:
    with pytest.raises(RequestError) as e:
        call()
    return e.value.status, e.value.message


def test_base64_data_uri_and_wrapped_base64_give_the_same_pixels():
    text = b64(png())
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    sources = [text, f"data:image/png;base64,{text}", wrapped]
    [ex] = to_examples([("q", sources)], LIMITS)
    assert ex.where == "inputs[0]" and len(ex.images) == 3
    for img in ex.images:
        np.testing.assert_array_equal(image_to_array(img), PIXELS)


@pytest.mark.parametrize(
    "source, status, words",
    [
        ("@@@not base64", 400, "not valid base64"),
        ("iVBORw0KGgo", 400, "not valid base64"),  # bad padding
        ("data:image/png,abc", 400, "must be base64"),
        (b64(b"hello, not an image"), 400, "not an image"),
        (b64(png()[:60]), 400, "inputs[1].images[0]"),  # truncated
        ("A" * 6000, 413, "over the limit"),  # base64 text longer than max_image_bytes allows
        (b64(png(np.zeros((120, 90, 3), np.uint8))), 413, "10800 pixels"),  # limit: 10 000
    ],
)
def test_bad_images_are_refused_with_status_and_field(source, status, words):
    got, message = status_of(lambda: to_examples([("ok", [b64(png())]), ("q", [source])], LIMITS))
    assert got == status
    assert words in message and "inputs[1].images[0]" in message


def test_decoded_size_over_limit_is_413():
    noise = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    data = png(noise)  # ~4.8 kB of incompressible pixels, under 10 000 pixels
    assert len(data) > LIMITS.max_image_bytes
    status, message = status_of(lambda: to_examples([("q", [b64(data)])], LIMITS))
    assert status == 413 and "bytes" in message


def test_pixels_of_the_whole_request_are_bounded():
    small = b64(png(np.zeros((90, 90, 3), np.uint8)))  # 8100 pixels each, 25 000 per request
    assert len(to_examples([("q", [small, small, small])], LIMITS)[0].images) == 3
    status, message = status_of(
        lambda: to_examples([("q", [small] * 2), ("r", [small] * 2)], LIMITS)
    )
    assert status == 413 and "inputs[1].images[1]" in message and "per request" in message


def test_file_paths_need_an_allowlist_and_stay_inside_it(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "a.png").write_bytes(png())
    (outside / "b.png").write_bytes(png())
    (allowed / "link.png").symlink_to(outside / "b.png")
    sources = ImageSources(allowed_paths=(str(allowed),))

    assert image_bytes(f"file://{allowed}/a.png", sources, LIMITS, "x") == png()
    assert status_of(lambda: image_bytes(f"file://{allowed}/a.png", ImageSources(), LIMITS, "x"))[
        1
    ].startswith("x: file:// images are not accepted")
    for escape in (f"file://{allowed}/../outside/b.png", f"file://{allowed}/link.png"):
        status, message = status_of(lambda e=escape: image_bytes(e, sources, LIMITS, "x"))
        assert status == 400 and "outside the allowed folders" in message
    status, message = status_of(
        lambda: image_bytes(f"file://{allowed}/nope.png", sources, LIMITS, "x")
    )
    assert status == 400 and "not a file" in message


@pytest.fixture(scope="module")
def image_server(loopback_http):
    """An HTTP server on 127.0.0.1: /a.png is an image, /moved redirects to it."""

    def moved(handler, stop):
        handler.send_response(302)
        handler.send_header("Location", "/a.png")
        handler.end_headers()

    server = loopback_http({"/a.png": png(), "/moved": moved})
    yield server.url
    server.close()


def test_urls_are_fetched_only_under_an_allowed_prefix_without_redirects(image_server):
    sources = ImageSources(allowed_url_prefixes=(f"{image_server}/",))
    assert image_bytes(f"{image_server}/a.png", sources, LIMITS, "x") == png()
    status, message = status_of(
        lambda: image_bytes(f"{image_server}/a.png", ImageSources(), LIMITS, "x")
    )
    assert status == 400 and "send the image as base64" in message
    status, message = status_of(lambda: image_bytes(f"{image_server}/moved", sources, LIMITS, "x"))
    assert status == 400 and "302" in message
    status, message = status_of(lambda: image_bytes(f"{image_server}/gone", sources, LIMITS, "x"))
    assert status == 400 and "HTTP 404" in message


def test_image_sources_and_limits_check_their_settings():
    with pytest.raises(ValueError, match="absolute"):
        ImageSources(allowed_paths=("relative/dir",))
    with pytest.raises(ValueError, match="host and a path"):
        ImageSources(allowed_url_prefixes=("https://example.com",))
    with pytest.raises(ValueError, match="max_inputs=0"):
        RequestLimits(max_inputs=0)


def test_request_error_keeps_its_status_when_pickled():
    e = pickle.loads(pickle.dumps(RequestError(413, "too big")))
    assert (e.status, e.message, str(e)) == (413, "too big", "too big")


# --- model references ---------------------------------------------------------------------


def tiny_artifact(info, heads, labels=("cat", "dog")) -> SavArtifact:
    rng = np.random.default_rng(0)
    heads = np.asarray(heads, dtype=np.int64)  # [k, 2]
    return SavArtifact(
        labels=list(labels),
        heads=heads,
        centroids=rng.standard_normal((len(labels), len(heads), info.head_dim)).astype(np.float32),
        base_model=info,
        prompt=PromptConfig(),
        selection=Selection("paper", len(heads), dict.fromkeys(labels, 5), [1.0] * len(heads)),
    )


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """A private copy of the tiny Qwen2-VL (the counter's hooks must not reach other tests)."""
    from sav_ray.core.models import load_model

    return load_model(str(tiny_model_dir("qwen2_vl")))


def test_folder_reference_is_pinned_by_the_hash_of_its_sav_json(tmp_path, lm):
    folder = tmp_path / "art"
    first = write_artifact(tiny_artifact(lm.info, [[0, 1]]), folder)
    resolved = resolve_ref(str(folder), alias_version=None)
    assert resolved.version is None
    assert split_model_id(resolved.model_id) == (str(folder.resolve()), first.digest)
    second = write_artifact(tiny_artifact(lm.info, [[1, 1]]), folder, overwrite=True)
    assert second.digest != first.digest
    assert resolve_ref(str(folder), None).model_id == f"{folder.resolve()}#sha256={second.digest}"
    with pytest.raises(ValueError, match="cannot be read"):
        resolve_ref(str(tmp_path / "missing"), None)


def test_registry_reference_resolves_aliases_and_keeps_versions():
    asked = []

    def alias_version(name, alias):
        asked.append((name, alias))
        return 7

    resolved = resolve_ref("models:/pets@production", alias_version)
    assert (resolved.model_id, resolved.version) == ("models:/pets/7", "7")
    assert resolve_ref("models:/pets/3", alias_version).model_id == "models:/pets/3"
    assert asked == [("pets", "production")]
    assert split_model_id("models:/pets/3") == ("models:/pets/3", None)
    with pytest.raises(LookupError, match="models:/NAME@ALIAS"):
        resolve_ref("models:/pets", alias_version)


# --- classification ---------------------------------------------------------------------------


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(lm, example, artifacts):
    return encode_example(lm.processor, example, [(a.prompt, a.preprocessing) for a in artifacts])


def test_an_input_the_processor_refuses_is_a_422_naming_it(lm):
    artifact = tiny_artifact(lm.info, [[1, 0]])
    elongated = Example("c", [image(5000, 20)], "inputs[1]")  # aspect ratio 250: Qwen2-VL refuses
    with pytest.raises(RequestError) as e:
        encoded(lm, elongated, [artifact])
    assert e.value.status == 422
    assert e.value.message.startswith("inputs[1]: the model cannot take this input")


def test_an_input_the_model_refuses_fails_alone_in_its_batch(lm):
    artifact = tiny_artifact(lm.info, [[1, 0], [0, 3], [1, 2]])
    good = [Example("a", [image(56, 56, 1)]), Example("b", [image(40, 30, 2)])]
    rows = [encoded(lm, ex, [artifact]) for ex in good]
    [bad] = [encoded(lm, Example("c", [image(56, 56, 3)]), [artifact])]
    for row in bad.values():  # 4 image tokens fewer than image features: a ValueError
        ids = row["input_ids"][0]
        drop = (ids == lm.model.config.image_token_id).nonzero()[:4, 0]
        keep = torch.ones(len(ids), dtype=torch.bool)
        keep[drop] = False
        row["input_ids"] = row["input_ids"][:, keep]
        row["attention_mask"] = row["attention_mask"][:, keep]
    batch = [(rows[0], [artifact]), (bad, [artifact]), (rows[1], [artifact])]
    results, n = classify_shared(lm, batch, where=["inputs[0]", "inputs[1]", "inputs[2]"])
    assert isinstance(results[1], RequestError) and results[1].status == 422
    assert results[1].message.startswith("inputs[1]: the model cannot take this input")
    alone = [predict_examples(lm, artifact, [ex]) for ex in good]
    assert [results[0], results[2]] == alone
    assert n == 2  # the two good inputs, each run alone after the batch failed


def test_artifacts_sharing_a_prompt_share_one_forward_row_per_input(lm):
    """Three inputs naming different subsets of two artifacts: one forward call of 3 rows, to
    the deeper artifact's layer; each artifact's results equal predicting with it alone."""
    shallow = tiny_artifact(lm.info, [[0, 1], [0, 3]])
    deep = tiny_artifact(lm.info, [[1, 0], [0, 2], [1, 3]], labels=("red", "green", "blue"))
    examples = [
        Example("a", [image(56, 56, 1)]),
        Example("b", [image(40, 30, 2)]),
        Example("c", []),
    ]
    named = [[shallow, deep], [deep], [deep, shallow]]
    items = [(encoded(lm, ex, arts), arts) for ex, arts in zip(examples, named, strict=True)]
    assert all(len(rows) == 1 for rows, _ in items)  # one prompt: one encoding per input
    counter = LayerCounter(lm.model)
    try:
        results, rows = classify_shared(lm, items)
    finally:
        counter.remove()
    assert rows == 3 and counter.rows == 3
    assert counter.counts == [1, 1] + [0] * (lm.info.num_layers - 2)  # one forward call
    for ex, arts, got in zip(examples, named, results, strict=True):
        assert got == [predict_examples(lm, a, [ex])[0] for a in arts]
    assert results[0][1].label in ("red", "green", "blue")


def test_artifacts_with_other_prompts_add_rows_to_the_same_forward_call(lm):
    plain = tiny_artifact(lm.info, [[0, 1], [1, 2]])
    asked = tiny_artifact(lm.info, [[1, 1]])
    asked.prompt = PromptConfig(text_template="Answer briefly. {text}")
    examples = [Example("a", [image(56, 56, 1)]), Example("b", [])]
    counter = LayerCounter(lm.model)
    try:
        items = [(encoded(lm, ex, [plain, asked]), [plain, asked]) for ex in examples]
        results, rows = classify_shared(lm, items)
    finally:
        counter.remove()
    assert rows == 4 and counter.rows == 4 and counter.counts[0] == 1
    for ex, got in zip(examples, results, strict=True):
        assert got == [predict_examples(lm, a, [ex])[0] for a in (plain, asked)]


def test_placeholder_count_must_match_the_images(lm):
    artifact = tiny_artifact(lm.info, [[0, 0]])
    encoded(lm, Example("compare <image> and <image>", [image(8, 8)] * 2), [artifact])
    with pytest.raises(RequestError) as e:
        encoded(lm, Example("compare <image> and <image>", [image(8, 8)], "inputs[4]"), [artifact])
    assert e.value.status == 422 and "inputs[4]" in e.value.message


def test_layer_counter_shows_layers_after_the_deepest_never_run(lm):
    counter = LayerCounter(lm.model)
    try:
        artifact = tiny_artifact(lm.info, [[1, 0], [0, 2]])  # deepest selected layer: 1
        predict_examples(lm, artifact, [Example("a", [image(56, 56)]), Example("b", [])])
        assert counter.counts == [1, 1] + [0] * (lm.info.num_layers - 2)
    finally:
        counter.remove()
    predict_examples(lm, artifact, [Example("a", [])])
    assert counter.counts[0] == 1  # removed hooks count nothing


def test_batch_stats_report_sizes_composition_and_failures():
    stats = BatchStats()
    stats.record([["m1"], ["m1", "m2"], ["m2"]], [object(), object(), RequestError(422, "x")], 3)
    stats.record([["m2"]], [object()], 1)
    stats.record([["m1"]] * 3, [object(), object(), object()], 3)
    stats.seconds["forward"] = 0.5
    assert stats.to_dict() == {
        "batches": 3,
        "inputs": 7,
        "max_batch_size": 3,
        "batch_sizes": {"1": 1, "3": 2},
        "inputs_per_model": {"m1": 5, "m2": 3},
        "models_per_batch": {"1": 2, "2": 1},
        "forward_rows": 7,
        "input_errors": 1,
        "seconds": {"forward": 0.5},
    }
