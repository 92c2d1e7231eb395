"""Input manifests: JSONL, JSON, Parquet or CSV rows read into one normalised Arrow table.

A manifest row names zero or more images, a text and a label (docs/design.md, "Input manifest").
`read_manifest` returns a table (`MANIFEST_SCHEMA`) with the columns

    row     int64          1-based data row number, used in every message about the row
    id      string         the id field's value, or the row number as a string
    images  list<string>   absolute image paths, in order across the image fields
    video   string         the absolute path of the row's video, or null (`sav_ray.core.video`)
    text    string         the row's text ("" when null or missing)
    label   string         the row's label; null only when labels are not required

Row numbers count data rows from 1: the n-th object of a JSON array, the n-th non-blank line
of a JSONL file, the n-th record after a CSV file's header, the n-th row of a Parquet file.

Reading checks the manifest's structure only. `check_image_files` checks that the images
and videos exist, and `validate_for_fit` that the labels can fit a classifier.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from sav_ray.core.video import VIDEO_SUFFIXES

MANIFEST_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("id", pa.string()),
        ("images", pa.list_(pa.string())),
        ("video", pa.string()),
        ("text", pa.string()),
        ("label", pa.string()),
    ]
)

# The video field read where a manifest has it, when no other is named.
DEFAULT_VIDEO_FIELD = "video"

# Where the source file and field names travel with the table, so that later checks can name them.
_METADATA_KEY = b"sav_ray.core.manifest"


class ManifestError(ValueError):
    """A manifest cannot be used; the message names the file, row and field and how to fix it."""


@dataclass(frozen=True)
class ManifestFields:
    """Which manifest fields hold the images, the text, the label and (optionally) the id.

    Each image field's value is a path string, null, or a list of path strings; with no image
    fields at all (`image=()`) every row is text-only. `video` names the field holding one
    video path (or null) per row; None reads `DEFAULT_VIDEO_FIELD` where the manifest has it,
    while a field named here must be in the manifest.
    """

    image: tuple[str, ...] = ("image",)
    text: str = "question"
    label: str = "label"
    id: str | None = None
    video: str | None = None

    @property
    def video_field(self) -> str:
        return self.video or DEFAULT_VIDEO_FIELD

    def __post_init__(self) -> None:
        if isinstance(self.image, str):
            raise ManifestError(
                f"ManifestFields.image must be a tuple of field names, not the string "
                f"{self.image!r}; use ManifestFields.from_flags(image={self.image!r}) "
                "for comma-separated names"
            )
        named = [*self.image, self.text, self.label] + [
            name for name in (self.id, self.video) if name is not None
        ]
        if any(not isinstance(name, str) or not name for name in named):
            raise ManifestError(f"field names must be non-empty strings, got {self}")
        twice = [name for name, n in Counter(self.image).items() if n > 1]
        if twice:
            raise ManifestError(f"image field {twice[0]!r} is named twice; name each field once")

    @classmethod
    def from_flags(
        cls,
        image: str = "image",
        text: str = "question",
        label: str = "label",
        id: str | None = None,
        video: str | None = None,
    ) -> ManifestFields:
        """Fields from command-line flags: `image` is comma-separated ("image_1,image_2")."""
        images = tuple(name.strip() for name in image.split(",") if name.strip())
        return cls(image=images, text=text, label=label, id=id or None, video=video or None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": list(self.image),
            "text": self.text,
            "label": self.label,
            "id": self.id,
            "video": self.video,
        }


# (column names in the file, one dict per data row)
_Records = tuple[list[str], list[dict[str, Any]]]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (bytes, bytearray)):
        return "binary"
    return type(value).__name__


def _describe(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"binary data ({len(value)} bytes)"
    text = repr(value)
    return f"{_json_type(value)} {text if len(text) <= 60 else text[:57] + '...'}"


def _columns_of(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for record in records for key in record))


def _read_jsonl(path: Path, wanted: Sequence[str]) -> _Records:
    records = []
    with path.open(encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(
                    f"{path}: line {line_number} is not valid JSON ({e.msg} at column {e.colno}); "
                    "each line of a .jsonl manifest must hold one JSON object"
                ) from None
            if not isinstance(record, dict):
                raise ManifestError(
                    f"{path}: line {line_number} holds a JSON {_json_type(record)}, not an object; "
                    'each line must be one object such as {"image": ..., "question": ..., "label": ...}'
                )
            records.append(record)
    return _columns_of(records), records


def _read_json(path: Path, wanted: Sequence[str]) -> _Records:
    """A .json manifest is one array of row objects; wrappers such as {"data": [...]} are refused."""
    try:
        with path.open(encoding="utf-8-sig") as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise ManifestError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None
    if not isinstance(records, list):
        raise ManifestError(
            f"{path}: holds a JSON {_json_type(records)}, but a .json manifest must be an array "
            "of row objects ([{...}, {...}]); write the array itself (not wrapped in an object), "
            "or write one object per line to a .jsonl file"
        )
    for row, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise ManifestError(
                f"{path}: row {row} (element {row} of the array) is a JSON "
                f"{_json_type(record)}, not an object; every element must be one row object"
            )
    return _columns_of(records), records


def _read_parquet(path: Path, wanted: Sequence[str]) -> _Records:
    try:
        columns = pq.read_schema(path).names
        table = pq.read_table(path, columns=[name for name in wanted if name in columns])
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"{path}: cannot be read as Parquet ({e})") from None
    return columns, table.to_pylist()


def _read_csv(path: Path, wanted: Sequence[str]) -> _Records:
    """Every CSV cell is read as a string (no type guessing), and an empty cell as null."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        columns = next(csv.reader(f), None)
    if not columns:
        raise ManifestError(f"{path}: empty CSV file; its first line must name the columns")
    options = pa_csv.ConvertOptions(
        column_types={name: pa.string() for name in columns},
        include_columns=[name for name in wanted if name in columns],
        strings_can_be_null=True,
        # Only an empty cell is null: labels such as "NA" or "None" stay labels.
        null_values=[""],
    )
    try:
        table = pa_csv.read_csv(
            path,
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=options,
        )
    except pa.ArrowException as e:
        raise ManifestError(f"{path}: not a valid CSV file ({e})") from None
    return columns, table.to_pylist()


FORMATS: dict[str, Callable[[Path, Sequence[str]], _Records]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _scalar_text(value: Any, field: str, where: str) -> str | None:
    """A label or id as a string: str() of numbers (1.0 as "1"), None when null or blank."""
    if _is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (str, int, float)):
        value = str(value)
        return value if value.strip() else None
    raise ManifestError(
        f"{where}: field {field!r} must be a string or a number, not {_describe(value)}"
    )


def _image_paths(value: Any, field: str, where: str, folder: str) -> list[str]:
    if _is_missing(value):
        return []
    paths = []
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if _is_missing(item) or (isinstance(item, str) and not item.strip()):
            continue
        if not isinstance(item, str):
            hint = (
                "; a manifest holds image paths, not image data: write the images to files"
                if isinstance(item, (bytes, bytearray))
                else ""
            )
            raise ManifestError(
                f"{where}: field {field!r} must be an image path, a list of image paths or "
                f"null, not {_describe(item)}{hint}"
            )
        if "://" in item:
            raise ManifestError(
                f"{where}: field {field!r} holds the URL {item!r}; only local image files are "
                "read: download the images and give their paths"
            )
        paths.append(os.path.abspath(os.path.join(folder, os.path.expanduser(item))))
    return paths


def _video_path(value: Any, field: str, where: str, folder: str) -> str | None:
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ManifestError(
            f"{where}: field {field!r} must be the path of one video file or null, not "
            f"{_describe(value)}"
        )
    if "://" in value:
        raise ManifestError(
            f"{where}: field {field!r} holds the URL {value!r}; only local video files are "
            "read: download the video and give its path"
        )
    if not value.lower().endswith(VIDEO_SUFFIXES):
        raise ManifestError(
            f"{where}: field {field!r} holds {value!r}, which is not a video file name; a video "
            f"must end in one of {', '.join(VIDEO_SUFFIXES)}"
        )
    return os.path.abspath(os.path.join(folder, os.path.expanduser(value)))


def _check_fields_present(
    path: Path, fields: ManifestFields, columns: list[str], require_label: bool
) -> None:
    roles = [("image", name) for name in fields.image] + [("text", fields.text)]
    if require_label:
        roles.append(("label", fields.label))
    if fields.id is not None:
        roles.append(("id", fields.id))
    if fields.video is not None:
        roles.append(("video", fields.video))
    for role, name in roles:
        if name not in columns:
            raise ManifestError(
                f"{path}: {role} field {name!r} is not in the manifest; its fields are "
                f"{columns}; set the {role} field name to one of those"
                + (" (or to '' for text-only rows: --image-field '')" if role == "image" else "")
            )


def read_manifest(
    path: str | Path, fields: ManifestFields = ManifestFields(), *, require_label: bool = True
) -> pa.Table:
    """Read a manifest (.jsonl, .json, .parquet or .csv) into a `MANIFEST_SCHEMA` table.

    Relative image paths resolve against the manifest's folder; null and empty image values
    are skipped. A null or missing text becomes "". Labels and ids that are numbers become
    strings (1 and 1.0 both as "1"). With `require_label=False` the label field may be absent
    or empty (labels are then null), as for a manifest to classify. Image files are not opened
    here: see `check_image_files`.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest file not found: {path}; check the path")
    loader = FORMATS.get(path.suffix.lower())
    if loader is None:
        raise ManifestError(
            f"{path}: unknown manifest format {path.suffix!r}; name the file with one of "
            f"{', '.join(FORMATS)}"
        )
    named = [*fields.image, fields.text, fields.label, fields.video_field]
    named += [fields.id] if fields.id else []
    try:
        columns, records = loader(path, list(dict.fromkeys(named)))
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e}); save the manifest as UTF-8") from None
    if not records:
        raise ManifestError(f"{path}: the manifest has no rows")
    _check_fields_present(path, fields, columns, require_label)

    folder = os.path.dirname(os.path.abspath(path))
    ids, images, videos, texts, labels = [], [], [], [], []
    row_of_id: dict[str, int] = {}
    for row, record in enumerate(records, 1):
        where = f"{path}: row {row}"
        paths = []
        for name in fields.image:
            paths += _image_paths(record.get(name), name, where, folder)
        images.append(paths)
        videos.append(
            _video_path(record.get(fields.video_field), fields.video_field, where, folder)
        )

        text = record.get(fields.text)
        if _is_missing(text):
            text = ""
        elif isinstance(text, (int, float)):
            text = str(text)
        elif not isinstance(text, str):
            raise ManifestError(
                f"{where}: field {fields.text!r} must be text, not {_describe(text)}"
            )
        texts.append(text)

        label = _scalar_text(record.get(fields.label), fields.label, where)
        if label is None and require_label:
            raise ManifestError(
                f"{where}: field {fields.label!r} is empty; every training row needs a label"
            )
        labels.append(label)

        if fields.id is None:
            ids.append(str(row))
            continue
        id_ = _scalar_text(record.get(fields.id), fields.id, where)
        if id_ is None:
            raise ManifestError(
                f"{where}: field {fields.id!r} is empty; every row needs an id when an id field "
                "is named"
            )
        if id_ in row_of_id:
            raise ManifestError(
                f"{path}: field {fields.id!r}: rows {row_of_id[id_]} and {row} both have the id "
                f"{id_!r}; ids must be unique"
            )
        row_of_id[id_] = row
        ids.append(id_)

    source = {"path": str(path.absolute()), "fields": fields.to_dict()}
    schema = MANIFEST_SCHEMA.with_metadata({_METADATA_KEY: json.dumps(source).encode()})
    return pa.table(
        {
            "row": list(range(1, len(records) + 1)),
            "id": ids,
            "images": images,
            "video": videos,
            "text": texts,
            "label": labels,
        },
        schema=schema,
    )


def _source(table: pa.Table, role: str = "label") -> tuple[str, Any]:
    """The message prefix naming the manifest file, and the name(s) of the `role` field(s)."""
    raw = (table.schema.metadata or {}).get(_METADATA_KEY)
    if raw is None:
        return "", ManifestFields().to_dict()[role]
    source = json.loads(raw)
    return f"{source['path']}: ", source["fields"][role]


def check_image_files(table: pa.Table) -> None:
    """Raise ManifestError naming the first row whose image or video file does not exist."""
    exists: dict[str, bool] = {}
    missing: list[tuple[int, str, str]] = []  # (row, "image" or "video", path)
    for row, paths, video in zip(
        table["row"].to_pylist(),
        table["images"].to_pylist(),
        table["video"].to_pylist(),
        strict=True,
    ):
        named = [("image", p) for p in paths] + ([("video", video)] if video else [])
        for kind, p in named:
            if p not in exists:
                exists[p] = os.path.isfile(p)
            if not exists[p]:
                missing.append((row, kind, p))
    if missing:
        prefix, _ = _source(table)
        row, kind, p = missing[0]
        files = len({p for _, _, p in missing})
        rows = len({row for row, _, _ in missing})
        raise ManifestError(
            f"{prefix}row {row}: {kind} file not found: {p} ({files} missing file(s) in "
            f"{rows} row(s)); relative paths resolve against the manifest's folder"
        )


def refuse_images(table: pa.Table, reason: str) -> None:
    """Raise ManifestError naming the first row with an image or a video: `reason` says why none
    may have one (e.g. the base model takes text only)."""
    rows = zip(
        table["row"].to_pylist(),
        table["images"].to_pylist(),
        table["video"].to_pylist(),
        strict=True,
    )
    for row, paths, video in rows:
        if paths:
            prefix, names = _source(table, "image")
            field = " or ".join(repr(name) for name in names)
            raise ManifestError(
                f"{prefix}row {row}: field {field} gives an image, but {reason}; give rows "
                "without images, or read no image field (--image-field '')"
            )
        if video:
            prefix, name = _source(table, "video")
            raise ManifestError(
                f"{prefix}row {row}: field {name or DEFAULT_VIDEO_FIELD!r} gives a video, but "
                f"{reason}; give rows without videos"
            )


def labels_of(table: pa.Table) -> tuple[str, ...]:
    """The sorted distinct labels (nulls left out)."""
    return tuple(sorted({label for label in table["label"].to_pylist() if label is not None}))


def class_counts(table: pa.Table) -> dict[str, int]:
    """Rows per label, in `labels_of` order (nulls left out)."""
    counts = Counter(label for label in table["label"].to_pylist() if label is not None)
    return {label: counts[label] for label in sorted(counts)}


_SELECTIONS = ("paper", "loo")


def validate_for_fit(table: pa.Table, selection: str) -> tuple[str, ...]:
    """Check that the rows can fit a classifier with `selection`; return `labels_of(table)`.

    Every row needs a label, there must be at least 2 classes, and "loo" selection (each
    example compared with centroids that leave it out) needs at least 2 examples per class.
    """
    if selection not in _SELECTIONS:
        raise ValueError(f"unknown selection method {selection!r}; choose one of {_SELECTIONS}")
    prefix, field = _source(table)
    rows = table["row"].to_pylist()
    labels = table["label"].to_pylist()
    unlabelled = [row for row, label in zip(rows, labels, strict=True) if label is None]
    if unlabelled:
        raise ManifestError(
            f"{prefix}row {unlabelled[0]}: field {field!r} is empty ({len(unlabelled)} row(s) "
            "without a label); fitting needs a label on every row"
        )
    counts = class_counts(table)
    if len(counts) < 2:
        found = f"only the class {next(iter(counts))!r}" if counts else "no rows"
        raise ManifestError(
            f"{prefix}field {field!r} has {found}; a classifier needs examples of at least "
            "2 classes"
        )
    if selection == "loo":
        single = [label for label, n in counts.items() if n < 2]
        if single:
            row = rows[labels.index(single[0])]
            others = f" (and {len(single) - 1} more class(es) like it)" if len(single) > 1 else ""
            raise ManifestError(
                f"{prefix}class {single[0]!r} of field {field!r} has only 1 example "
                f"(row {row}){others}; 'loo' selection leaves each example out of its class "
                "centroid, so it needs at least 2 per class: add examples or use 'paper' "
                "selection"
            )
    return tuple(counts)
