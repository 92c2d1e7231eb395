"""Tests for the SAV artifact writer and loader (sav_ray/core/artifact.py) and its JSON Schema."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

import sav_ray.core.artifact as artifact_module
from sav_ray import __version__
from sav_ray.core.artifact import (
    ARTIFACT_FILE,
    CENTROIDS_FILE,
    HEAD_SCORES_FILE,
    ArtifactError,
    BaseModelInfo,
    SavArtifact,
    Selection,
    load_artifact,
    load_schema,
    write_artifact,
)
from sav_ray.core.prompts import PromptConfig
from sav_ray.core.resolution import Preprocessing

REPO = Path(__file__).parents[1]
MODEL = BaseModelInfo(
    name_or_path="tiny/qwen2-vl",
    revision="abc123",
    architecture="Qwen2VLForConditionalGeneration",
    num_layers=4,
    num_heads=6,
    head_dim=8,
    dtype="float32",
)


def make_artifact(with_head_scores: bool = True) -> SavArtifact:
    rng = np.random.default_rng(0)
    heads = np.array([[3, 1], [0, 5], [2, 2]], dtype=np.int64)  # [k, 2]
    return SavArtifact(
        labels=["cat", "dog"],
        heads=heads,
        centroids=rng.standard_normal((2, 3, 8)).astype(np.float32),  # [C, k, D]
        base_model=MODEL,
        prompt=PromptConfig(text_template="Q: {text}", system_prompt="Be brief."),
        selection=Selection(
            method="paper",
            k=3,
            examples_per_class={"cat": 20, "dog": 19},
            scores=[0.95, 0.9, 0.9],
        ),
        head_scores=rng.uniform(0, 1, (4, 6)) if with_head_scores else None,  # [L, H] float64
    )


def assert_same(a: SavArtifact, b: SavArtifact) -> None:
    for f in dataclasses.fields(SavArtifact):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape, f.name
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
            assert x == y, f.name


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def edit_doc(art_dir: Path, change) -> None:
    doc = json.loads((art_dir / ARTIFACT_FILE).read_text())
    change(doc)
    (art_dir / ARTIFACT_FILE).write_text(json.dumps(doc))


def test_round_trip_keeps_every_field(tmp_path):
    written = write_artifact(make_artifact(), tmp_path / "sav")
    loaded = load_artifact(tmp_path / "sav", expect=MODEL)
    assert_same(written, loaded)
    assert loaded.digest == written.digest
    assert loaded.package_version == __version__
    assert loaded.created_at.endswith("Z")
    assert set(loaded.sha256) == {CENTROIDS_FILE, HEAD_SCORES_FILE}
    assert loaded.heads.dtype == np.int64 and loaded.centroids.dtype == np.float32
    assert loaded.head_scores.dtype == np.float64
    assert loaded.deepest_layer == 3
    assert sorted(p.name for p in (tmp_path / "sav").iterdir()) == [
        CENTROIDS_FILE,
        HEAD_SCORES_FILE,
        ARTIFACT_FILE,
    ]


def test_round_trip_without_head_scores_and_null_fields(tmp_path):
    art = make_artifact(with_head_scores=False)
    art.base_model = dataclasses.replace(MODEL, revision=None)
    art.prompt = PromptConfig()
    written = write_artifact(art, tmp_path / "sav")
    loaded = load_artifact(tmp_path / "sav")
    assert_same(written, loaded)
    assert loaded.head_scores is None and loaded.base_model.revision is None
    assert not (tmp_path / "sav" / HEAD_SCORES_FILE).exists()


def test_sav_json_is_sorted_indented_and_digest_is_its_hash(tmp_path):
    import hashlib

    written = write_artifact(make_artifact(), tmp_path / "sav")
    raw = (tmp_path / "sav" / ARTIFACT_FILE).read_bytes()
    doc = json.loads(raw)
    assert raw.decode() == json.dumps(doc, sort_keys=True, indent=2) + "\n"
    assert written.digest == hashlib.sha256(raw).hexdigest()
    assert doc["heads"] == [[3, 1], [0, 5], [2, 2]]
    assert doc["files"][CENTROIDS_FILE]["shape"] == [2, 3, 8]
    assert doc["files"][CENTROIDS_FILE]["sha256"] == written.sha256[CENTROIDS_FILE]


def test_writer_fills_but_keeps_given_created_at_and_version(tmp_path):
    art = make_artifact()
    art.created_at, art.package_version = "2026-01-02T03:04:05Z", "9.9.9"
    write_artifact(art, tmp_path / "sav")
    loaded = load_artifact(tmp_path / "sav")
    assert (loaded.created_at, loaded.package_version) == ("2026-01-02T03:04:05Z", "9.9.9")


def test_float64_centroids_are_stored_as_float32(tmp_path):
    art = make_artifact()
    art.centroids = art.centroids.astype(np.float64)
    write_artifact(art, tmp_path / "sav")
    loaded = load_artifact(tmp_path / "sav")
    assert loaded.centroids.dtype == np.float32
    np.testing.assert_array_equal(loaded.centroids, art.centroids.astype(np.float32))


def test_digest_of_an_unwritten_artifact_is_an_error():
    with pytest.raises(ArtifactError, match="write_artifact"):
        _ = make_artifact().digest


@pytest.mark.parametrize("name", [CENTROIDS_FILE, HEAD_SCORES_FILE])
@pytest.mark.parametrize("where", ["header", "data"])
def test_one_flipped_byte_is_refused_naming_the_file(tmp_path, name, where):
    write_artifact(make_artifact(), tmp_path / "sav")
    path = tmp_path / "sav" / name
    flip_byte(path, 20 if where == "header" else path.stat().st_size - 3)
    with pytest.raises(ArtifactError, match=rf"{name}: SHA-256 .* does not match"):
        load_artifact(tmp_path / "sav")


@pytest.mark.parametrize("name", [CENTROIDS_FILE, HEAD_SCORES_FILE, ARTIFACT_FILE])
def test_missing_file_is_refused_naming_it(tmp_path, name):
    write_artifact(make_artifact(), tmp_path / "sav")
    (tmp_path / "sav" / name).unlink()
    with pytest.raises(ArtifactError, match=rf"{name} is missing"):
        load_artifact(tmp_path / "sav")


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope")


def test_unknown_schema_version_is_refused_naming_it(tmp_path):
    write_artifact(make_artifact(), tmp_path / "sav")
    # Version 3 may change anything: the version check must come before schema validation.
    edit_doc(tmp_path / "sav", lambda d: d.update(schema_version=99, labels="x", new_key=1))
    with pytest.raises(ArtifactError, match=r"schema_version 99, .*\(supported: 1, 2, 3, 4\)"):
        load_artifact(tmp_path / "sav")


def test_preprocessing_round_trips(tmp_path):
    applied = {"image_processor": "Qwen2VLImageProcessorPil", "settings": {"size": {}}, "notes": []}
    art = dataclasses.replace(
        make_artifact(),
        preprocessing=Preprocessing(max_image_pixels=200_704),
        preprocessing_applied=applied,
    )
    write_artifact(art, tmp_path / "sav")
    back = load_artifact(tmp_path / "sav")
    assert back.preprocessing == Preprocessing(max_image_pixels=200_704)
    assert back.preprocessing_applied == applied


def test_version_1_artifact_loads_with_processor_defaults(tmp_path):
    """A version-1 sav.json (no preprocessing) still loads: processor defaults."""
    write_artifact(make_artifact(), tmp_path / "sav")
    edit_doc(tmp_path / "sav", lambda d: (d.update(schema_version=1), d.pop("preprocessing")))
    art = load_artifact(tmp_path / "sav")
    assert art.schema_version == 1
    assert art.preprocessing == Preprocessing()
    assert art.preprocessing_applied["settings"] == {}


def test_version_2_needs_preprocessing(tmp_path):
    write_artifact(make_artifact(), tmp_path / "sav")
    edit_doc(tmp_path / "sav", lambda d: d.pop("preprocessing"))
    with pytest.raises(ArtifactError, match="'preprocessing' is a required property"):
        load_artifact(tmp_path / "sav")


def test_missing_schema_version_is_refused(tmp_path):
    write_artifact(make_artifact(), tmp_path / "sav")
    edit_doc(tmp_path / "sav", lambda d: d.pop("schema_version"))
    with pytest.raises(ArtifactError, match="has no schema_version"):
        load_artifact(tmp_path / "sav")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(extra=1), r"'extra' was unexpected"),
        (lambda d: d.pop("labels"), r"'labels' is a required property"),
        (lambda d: d["base_model"].update(layers=4), r"at base_model: .*'layers' was unexpected"),
        (lambda d: d["selection"].update(method="best"), r"at selection\.method: 'best'"),
        (lambda d: d["heads"][0].append(7), r"at heads\[0\]"),
        (lambda d: d.update(labels=["cat", "cat"]), r"at labels: .*non-unique"),
        (lambda d: d["prompt"].update(text_template="no slot"), r"at prompt\.text_template"),
        (lambda d: d.update(created_at="yesterday"), r"at created_at"),
    ],
)
def test_schema_violation_is_refused(tmp_path, change, message):
    write_artifact(make_artifact(), tmp_path / "sav")
    edit_doc(tmp_path / "sav", change)
    with pytest.raises(ArtifactError, match=rf"sav.json does not match .*{message}"):
        load_artifact(tmp_path / "sav")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["selection"].update(k=2), r"selection.k is 2 but there are 3 heads"),
        (lambda d: d["heads"].__setitem__(0, [4, 1]), r"heads\[0\] = \[4, 1\] is outside"),
        (lambda d: d["base_model"].update(head_dim=16), r"centroids has shape \[2, 3, 8\]"),
        (lambda d: d["selection"].update(scores=[0.1, 0.9, 0.9]), r"non-increasing"),
        (lambda d: d["selection"]["examples_per_class"].pop("dog"), r"examples_per_class"),
    ],
)
def test_inconsistent_sav_json_is_refused(tmp_path, change, message):
    write_artifact(make_artifact(), tmp_path / "sav")
    edit_doc(tmp_path / "sav", change)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(tmp_path / "sav")


def test_nan_in_sav_json_is_refused(tmp_path):
    write_artifact(make_artifact(), tmp_path / "sav")
    path = tmp_path / "sav" / ARTIFACT_FILE
    path.write_text(path.read_text().replace("0.95", "NaN"))
    with pytest.raises(ArtifactError, match="not valid JSON: NaN is not allowed"):
        load_artifact(tmp_path / "sav")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_heads": 8}, r"num_heads 6 != 8"),
        ({"head_dim": 16}, r"head_dim 8 != 16"),
        ({"num_layers": 5}, r"num_layers 4 != 5"),
        ({"architecture": "LlavaOnevisionForConditionalGeneration"}, r"architecture"),
        ({"revision": "def456"}, r"revision 'abc123' != 'def456'"),
    ],
)
def test_incompatible_base_model_is_refused(tmp_path, change, message):
    write_artifact(make_artifact(), tmp_path / "sav")
    with pytest.raises(ArtifactError, match=message):
        load_artifact(tmp_path / "sav", expect=dataclasses.replace(MODEL, **change))


def test_path_dtype_and_unknown_revision_are_compatible(tmp_path):
    write_artifact(make_artifact(), tmp_path / "sav")
    other = dataclasses.replace(MODEL, name_or_path="/mirror/qwen", dtype="bfloat16", revision=None)
    assert load_artifact(tmp_path / "sav" / ARTIFACT_FILE, expect=other).labels == ["cat", "dog"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.centroids.__setitem__((1, 2, 3), np.nan), r"centroids have NaN"),
        (lambda a: setattr(a, "centroids", a.centroids[:, :2]), r"centroids has shape \[2, 2, 8\]"),
        (
            lambda a: setattr(a, "centroids", a.centroids[..., :4]),
            r"centroids has shape \[2, 3, 4\]",
        ),
        (lambda a: setattr(a, "heads", a.heads.astype(float)), r"heads must be an integer array"),
        (lambda a: a.heads.__setitem__((1, 1), 6), r"heads\[1\] = \[0, 6\] is outside"),
        (lambda a: setattr(a, "labels", ["cat", "cat"]), r"at labels: .*non-unique"),
        (lambda a: setattr(a, "labels", ["cat", ""]), r"at labels\[1\]"),
        (lambda a: setattr(a, "head_scores", np.ones((4, 5))), r"head_scores has shape \[4, 5\]"),
        (
            lambda a: setattr(a, "selection", dataclasses.replace(a.selection, k=2)),
            r"selection.k is 2",
        ),
        (
            lambda a: setattr(a, "selection", dataclasses.replace(a.selection, scores=[0.9])),
            r"selection.scores has 1 entries",
        ),
        (lambda a: setattr(a, "schema_version", 1), r"schema_version 1 cannot be written"),
    ],
)
def test_invalid_write_leaves_nothing_behind(tmp_path, change, message):
    art = make_artifact()
    change(art)
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(ArtifactError, match=message):
        write_artifact(art, parent / "sav")
    assert list(parent.iterdir()) == []


def test_failure_while_writing_removes_the_temp_dir(tmp_path, monkeypatch):
    def write_one_then_fail(directory: Path, blobs: dict[str, bytes]) -> None:
        (directory / CENTROIDS_FILE).write_bytes(blobs[CENTROIDS_FILE])
        raise OSError("disk full")

    monkeypatch.setattr(artifact_module, "_write_files", write_one_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_artifact(make_artifact(), tmp_path / "sav")
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_is_refused_without_overwrite(tmp_path):
    first = write_artifact(make_artifact(), tmp_path / "sav")
    with pytest.raises(ArtifactError, match=r"sav already exists; .*overwrite=True"):
        write_artifact(make_artifact(with_head_scores=False), tmp_path / "sav")
    assert load_artifact(tmp_path / "sav").digest == first.digest
    assert [p.name for p in tmp_path.iterdir()] == ["sav"]


def test_overwrite_replaces_the_artifact_and_leaves_no_leftovers(tmp_path):
    write_artifact(make_artifact(), tmp_path / "sav")
    art = make_artifact(with_head_scores=False)
    art.labels = ["bird", "fish"]
    art.selection = dataclasses.replace(art.selection, examples_per_class={"bird": 5, "fish": 6})
    second = write_artifact(art, tmp_path / "sav", overwrite=True)
    loaded = load_artifact(tmp_path / "sav")
    assert loaded.labels == ["bird", "fish"] and loaded.digest == second.digest
    assert not (tmp_path / "sav" / HEAD_SCORES_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["sav"]


def test_overwrite_refuses_a_directory_that_is_not_an_artifact(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("precious")
    with pytest.raises(ArtifactError, match=r"refusing to overwrite .*no sav.json"):
        write_artifact(make_artifact(), tmp_path / "data", overwrite=True)
    assert (tmp_path / "data" / "keep.txt").read_text() == "precious"


def test_empty_existing_directory_is_written_into(tmp_path):
    (tmp_path / "sav").mkdir()
    write_artifact(make_artifact(), tmp_path / "sav")
    assert load_artifact(tmp_path / "sav").labels == ["cat", "dog"]


def test_no_file_in_the_artifact_is_a_pickle(tmp_path):
    write_artifact(make_artifact(), tmp_path / "sav")
    for path in (tmp_path / "sav").iterdir():
        head = path.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
        assert b"PK\x03\x04" not in path.read_bytes()[:4]  # torch.save's zip container


def test_schema_is_valid_and_the_packaged_copy_is_identical():
    canonical = REPO / "artifacts_schema" / "sav.schema.json"
    packaged = REPO / "sav_ray" / "schema" / "sav.schema.json"
    assert canonical.read_bytes() == packaged.read_bytes()
    schema = json.loads(canonical.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert load_schema() == schema
    versions = schema["properties"]["schema_version"]["enum"]
    assert versions == list(artifact_module.SUPPORTED_SCHEMA_VERSIONS)
    assert artifact_module.SCHEMA_VERSION == max(versions)


def test_installed_package_finds_its_packaged_schema(tmp_path):
    # An installed sav_ray has no artifacts_schema/ beside it: the loader must use its own copy.
    shutil.copytree(
        REPO / "sav_ray", tmp_path / "sav_ray", ignore=shutil.ignore_patterns("__pycache__")
    )
    code = (
        "import sav_ray.core.artifact as a, json, pathlib;"
        "assert not (pathlib.Path(a.__file__).parents[1] / 'artifacts_schema').exists();"
        "print(json.dumps(a.load_schema()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == load_schema()


def test_every_schema_property_has_a_description_and_objects_are_closed():
    def walk(node, where):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, where
            for name, sub in node["properties"].items():
                assert "description" in sub, f"{where}.{name}"
                walk(sub, f"{where}.{name}")

    walk(load_schema(), "sav.json")
