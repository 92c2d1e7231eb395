"""Tests for sav_ray.core.manifest: every format, field options, and each error message."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sav_ray.core.manifest import (
    FORMATS,
    MANIFEST_SCHEMA,
    ManifestError,
    ManifestFields,
    check_image_files,
    class_counts,
    labels_of,
    read_manifest,
    validate_for_fit,
)

ROWS = [
    {"image": "imgs/a.png", "question": "What is it?", "label": "cat"},
    {"image": "imgs/b.png", "question": "Which animal?", "label": "dog"},
    {"image": None, "question": "Text only, with a comma", "label": "cat"},
    {"image": "/abs/c.png", "question": "", "label": "bird"},
]


def write(path, rows):
    """Write rows in the format named by the file's extension."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        assert suffix == ".csv"
        columns = list(dict.fromkeys(k for r in rows for k in r))
        lines = [",".join(columns)]
        for r in rows:
            cells = ["" if r.get(c) is None else str(r[c]) for c in columns]
            lines.append(",".join(f'"{c}"' if "," in c else c for c in cells))
        path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("suffix", sorted(FORMATS))
def test_every_format_reads_to_the_same_table(tmp_path, suffix):
    table = read_manifest(write(tmp_path / f"m{suffix}", ROWS))
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert table.to_pylist() == [
        {
            "row": 1,
            "id": "1",
            "images": [str(tmp_path / "imgs/a.png")],
            "video": None,
            "text": "What is it?",
            "label": "cat",
        },
        {
            "row": 2,
            "id": "2",
            "images": [str(tmp_path / "imgs/b.png")],
            "video": None,
            "text": "Which animal?",
            "label": "dog",
        },
        {
            "row": 3,
            "id": "3",
            "images": [],
            "video": None,
            "text": "Text only, with a comma",
            "label": "cat",
        },
        {"row": 4, "id": "4", "images": ["/abs/c.png"], "video": None, "text": "", "label": "bird"},
    ]


@pytest.mark.parametrize("suffix", sorted(FORMATS))
def test_int_labels_and_ids_become_strings(tmp_path, suffix):
    rows = [{"image": "x.png", "question": "q", "label": 0, "key": 10}]
    rows.append({"image": "y.png", "question": "q", "label": 1, "key": 11})
    table = read_manifest(write(tmp_path / f"m{suffix}", rows), ManifestFields(id="key"))
    assert table["label"].to_pylist() == ["0", "1"]
    assert table["id"].to_pylist() == ["10", "11"]


def test_float_labels_that_are_whole_numbers_read_as_ints(tmp_path):
    rows = [{"image": None, "question": "q", "label": 1.0}, {"question": "q", "label": 2.5}]
    table = read_manifest(write(tmp_path / "m.parquet", rows))
    assert table["label"].to_pylist() == ["1", "2.5"]


def test_several_image_fields_with_nulls_keep_their_order(tmp_path):
    rows = [
        {"image_1": "a.png", "image_2": "b.png", "question": "q", "label": "x"},
        {"image_1": None, "image_2": "c.png", "question": "q", "label": "y"},
        {"image_1": "", "image_2": None, "question": "q", "label": "x"},
    ]
    path = write(tmp_path / "m.jsonl", rows)
    table = read_manifest(path, ManifestFields.from_flags(image="image_2,image_1"))
    assert table["images"].to_pylist() == [
        [str(tmp_path / "b.png"), str(tmp_path / "a.png")],
        [str(tmp_path / "c.png")],
        [],
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_image_field_may_hold_a_list(tmp_path, suffix):
    rows = [
        {"image": ["a.png", "sub/b.png"], "question": "q", "label": "x"},
        {"image": [], "question": "q", "label": "y"},
    ]
    table = read_manifest(write(tmp_path / f"m{suffix}", rows))
    assert table["images"].to_pylist() == [
        [str(tmp_path / "a.png"), str(tmp_path / "sub" / "b.png")],
        [],
    ]


def test_relative_paths_resolve_against_the_manifest_folder_not_the_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    absolute = str(tmp_path / "elsewhere" / "z.png")
    rows = [{"image": ["../up.png", "./here.png", absolute], "question": "q", "label": "x"}]
    path = write(folder / "m.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    table = read_manifest(os.path.relpath(path, tmp_path))
    assert table["images"].to_pylist() == [
        [str(tmp_path / "up.png"), str(folder / "here.png"), absolute]
    ]


def test_other_field_names_and_missing_text(tmp_path):
    rows = [{"img": "a.png", "prompt": None, "y": "x"}, {"img": "b.png", "y": "z"}]
    path = write(tmp_path / "m.jsonl", rows)
    table = read_manifest(path, ManifestFields.from_flags(image="img", text="prompt", label="y"))
    assert table["text"].to_pylist() == ["", ""]
    assert table["label"].to_pylist() == ["x", "z"]


def test_jsonl_row_numbers_skip_blank_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('\n{"question": "q", "label": "a"}\n\n{"question": "q", "label": ""}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl: row 2: field 'label' is empty"):
        read_manifest(path, ManifestFields(image=()))


def test_labels_not_required_may_be_absent(tmp_path):
    path = write(tmp_path / "m.csv", [{"image": "a.png", "question": "q"}])
    table = read_manifest(path, require_label=False)
    assert table["label"].to_pylist() == [None]
    with pytest.raises(ManifestError, match=r"row 1: field 'label' is empty \(1 row\(s\)"):
        validate_for_fit(table, "paper")


def test_csv_cells_are_strings_and_only_empty_cells_are_null(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('image,question,label\n,"two\nlines",NA\n007.png,None,01\n')
    table = read_manifest(path)
    assert table["label"].to_pylist() == ["NA", "01"]
    assert table["text"].to_pylist() == ["two\nlines", "None"]
    assert table["images"].to_pylist() == [[], [str(tmp_path / "007.png")]]


def test_labels_and_counts(tmp_path):
    table = read_manifest(write(tmp_path / "m.jsonl", ROWS))
    assert labels_of(table) == ("bird", "cat", "dog")
    assert class_counts(table) == {"bird": 1, "cat": 2, "dog": 1}
    assert validate_for_fit(table, "paper") == ("bird", "cat", "dog")


# Errors ---------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ManifestError, match=r"manifest file not found: .*nope\.jsonl"):
        read_manifest(tmp_path / "nope.jsonl")


def test_unknown_extension(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("x")
    with pytest.raises(ManifestError, match=r"m\.txt: unknown manifest format '\.txt'.*\.jsonl"):
        read_manifest(path)


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"question": "q", "label": "a"}\n\n{"question": "q", label}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl: line 3 is not valid JSON"):
        read_manifest(path, ManifestFields(image=()))


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('["q", "a"]\n')
    with pytest.raises(ManifestError, match=r"line 1 holds a JSON array, not an object"):
        read_manifest(path)


def test_json_must_be_an_array_of_objects(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"data": ROWS}))
    with pytest.raises(ManifestError, match=r"m\.json: holds a JSON object.*must be an array"):
        read_manifest(path)
    path.write_text(json.dumps([ROWS[0], "oops"]))
    with pytest.raises(ManifestError, match=r"row 2 \(element 2 of the array\) is a JSON string"):
        read_manifest(path)
    path.write_text("[{")
    with pytest.raises(ManifestError, match=r"m\.json: not valid JSON .*line 1"):
        read_manifest(path)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "m.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match=r"m\.parquet: cannot be read as Parquet"):
        read_manifest(path)


def test_empty_manifest(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl: the manifest has no rows"):
        read_manifest(path)


@pytest.mark.parametrize("suffix", sorted(FORMATS))
def test_missing_field_is_named_with_the_fields_present(tmp_path, suffix):
    path = write(tmp_path / f"m{suffix}", ROWS)
    with pytest.raises(
        ManifestError,
        match=r"image field 'photo' is not in the manifest; its fields are "
        r"\['image', 'question', 'label'\]",
    ):
        read_manifest(path, ManifestFields(image=("photo",)))
    with pytest.raises(ManifestError, match=r"text field 'prompt' is not in the manifest"):
        read_manifest(path, ManifestFields(text="prompt"))
    with pytest.raises(ManifestError, match=r"label field 'class' is not in the manifest"):
        read_manifest(path, ManifestFields(label="class"))


@pytest.mark.parametrize("label", [None, "", "  "])
def test_row_without_label(tmp_path, label):
    rows = [*ROWS, {"image": "a.png", "question": "q", "label": label}]
    with pytest.raises(ManifestError, match=r"m\.jsonl: row 5: field 'label' is empty"):
        read_manifest(write(tmp_path / "m.jsonl", rows))


def test_label_of_the_wrong_type(tmp_path):
    rows = [{"image": "a.png", "question": "q", "label": ["cat"]}]
    with pytest.raises(ManifestError, match=r"row 1: field 'label' must be a string or a number"):
        read_manifest(write(tmp_path / "m.jsonl", rows))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, "not number 5"),
        ({"path": "a.png"}, "not object"),
        (["a.png", 3], "not number 3"),
        ([["a.png"]], "not array"),
    ],
)
def test_image_of_the_wrong_type(tmp_path, value, expected):
    rows = [ROWS[0], {"image": value, "question": "q", "label": "x"}]
    with pytest.raises(
        ManifestError,
        match=rf"row 2: field 'image' must be an image path, a list of image paths or null, {expected}",
    ):
        read_manifest(write(tmp_path / "m.jsonl", rows))


def test_image_bytes_in_parquet_are_refused_with_a_hint(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": [b"\x89PNG"], "question": ["q"], "label": ["x"]}), path)
    with pytest.raises(ManifestError, match=r"row 1: .*binary data \(4 bytes\).*write the images"):
        read_manifest(path)


def test_image_urls_are_refused(tmp_path):
    rows = [{"image": "https://example.com/a.png", "question": "q", "label": "x"}]
    with pytest.raises(ManifestError, match=r"row 1: field 'image' holds the URL"):
        read_manifest(write(tmp_path / "m.jsonl", rows))


def test_text_of_the_wrong_type(tmp_path):
    rows = [{"image": "a.png", "question": ["a", "b"], "label": "x"}]
    with pytest.raises(ManifestError, match=r"row 1: field 'question' must be text, not array"):
        read_manifest(write(tmp_path / "m.jsonl", rows))


def test_duplicate_ids_name_both_rows(tmp_path):
    rows = [{**r, "uid": uid} for r, uid in zip(ROWS, ["a", "b", "c", "b"], strict=True)]
    path = write(tmp_path / "m.jsonl", rows)
    with pytest.raises(ManifestError, match=r"field 'uid': rows 2 and 4 both have the id 'b'"):
        read_manifest(path, ManifestFields(id="uid"))
    with pytest.raises(ManifestError, match=r"id field 'key' is not in the manifest"):
        read_manifest(path, ManifestFields(id="key"))


def test_empty_id(tmp_path):
    rows = [{**ROWS[0], "uid": "a"}, {**ROWS[1], "uid": None}]
    with pytest.raises(ManifestError, match=r"row 2: field 'uid' is empty"):
        read_manifest(write(tmp_path / "m.jsonl", rows), ManifestFields(id="uid"))


def test_not_utf8(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"question": "\xff", "label": "a"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl: not UTF-8 text"):
        read_manifest(path)


def test_field_options_are_checked():
    assert ManifestFields.from_flags(image=" a, b ,").image == ("a", "b")
    assert ManifestFields.from_flags(image="").image == ()
    with pytest.raises(ManifestError, match="image field 'a' is named twice"):
        ManifestFields.from_flags(image="a,a")
    with pytest.raises(ManifestError, match="use ManifestFields.from_flags"):
        ManifestFields(image="a,b")


# Image files and fitting checks ---------------------------------------------------------------


def test_check_image_files_names_the_first_missing_row_and_counts_them(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"")
    rows = [
        {"image": "imgs/a.png", "question": "q", "label": "x"},
        {"image": None, "question": "q", "label": "x"},
        {"image": ["imgs/a.png", "imgs/gone.png"], "question": "q", "label": "y"},
        {"image": ["imgs/gone.png", "imgs/lost.png"], "question": "q", "label": "y"},
    ]
    path = write(tmp_path / "m.jsonl", rows)
    table = read_manifest(path)
    gone = tmp_path / "imgs" / "gone.png"
    with pytest.raises(ManifestError) as info:
        check_image_files(table)
    message = str(info.value)
    assert message.startswith(f"{path}: row 3: image file not found: {gone} ")
    assert "(2 missing file(s) in 2 row(s))" in message

    check_image_files(table.slice(0, 2))


def test_validate_for_fit_needs_two_classes(tmp_path):
    rows = [{"image": None, "question": "q", "y": "cat"}] * 3
    table = read_manifest(write(tmp_path / "m.jsonl", rows), ManifestFields(label="y"))
    with pytest.raises(ManifestError, match=r"m\.jsonl: field 'y' has only the class 'cat'"):
        validate_for_fit(table, "paper")


def test_validate_for_fit_loo_needs_two_examples_per_class(tmp_path):
    table = read_manifest(write(tmp_path / "m.jsonl", ROWS))
    assert validate_for_fit(table, "paper") == ("bird", "cat", "dog")
    with pytest.raises(
        ManifestError,
        match=r"class 'bird' of field 'label' has only 1 example \(row 4\) "
        r"\(and 1 more class\(es\) like it\)",
    ):
        validate_for_fit(table, "loo")
    with pytest.raises(ValueError, match="unknown selection method 'best'"):
        validate_for_fit(table, "best")
    two_each = pa.concat_tables([table, table])
    assert validate_for_fit(two_each, "loo") == ("bird", "cat", "dog")
