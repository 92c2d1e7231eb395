"""The SAV artifact: the one writer and the one loader (docs/design.md, "Artifact").

An artifact is a directory holding
    sav.json                  labels, heads, base model, prompt, preprocessing, selection,
                              SHA-256 of each tensor file
    centroids.safetensors     tensor `centroids`, float32 [C, k, D] (labels order, heads order)
    head_scores.safetensors   optional, tensor `head_scores` [L, H]
`sav.json` is validated against `artifacts_schema/sav.schema.json`; checks that span fields
(shapes against labels, heads within the model's geometry) are made here. No pickle anywhere:
tensors go through safetensors, the rest through JSON. Schema version 2 added `preprocessing`
(image resolution limits); a version-1 artifact loads with the processor's defaults. Version 3
adds optional fields (model families, text-only base models, video). Version 4 adds the
probabilities' `calibration` (temperature), the `decision` rule and an optional `threshold` on
one label's probability; an artifact without a calibration (versions 1 to 3) predicts vote
shares only, as before. All four load.

    art = write_artifact(SavArtifact(...), "out/my_sav")     # atomic: all files or nothing
    art = load_artifact("out/my_sav", expect=model_info)     # verifies schema, hashes, geometry
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import safetensors.numpy

from sav_ray import __version__
from sav_ray.core.calibration import Threshold
from sav_ray.core.prompts import PromptConfig
from sav_ray.core.resolution import Preprocessing, nothing_applied

SCHEMA_VERSION = 4
SUPPORTED_SCHEMA_VERSIONS = (1, 2, 3, 4)
ARTIFACT_FILE = "sav.json"
CENTROIDS_FILE = "centroids.safetensors"
HEAD_SCORES_FILE = "head_scores.safetensors"
SCHEMA_FILE = "sav.schema.json"

_TENSOR_NAMES = {CENTROIDS_FILE: "centroids", HEAD_SCORES_FILE: "head_scores"}


class ArtifactError(ValueError):
    """An artifact cannot be written or loaded; the message names the file or field."""


@dataclass(frozen=True)
class BaseModelInfo:
    """The frozen model the vectors come from; `revision` None means unknown."""

    name_or_path: str
    revision: str | None
    architecture: str  # e.g. "Qwen2VLForConditionalGeneration"
    num_layers: int
    num_heads: int
    head_dim: int
    dtype: str  # "float32", "bfloat16", ...
    # The inputs its processor takes; a text LLM's is ("text",). Artifacts from before schema
    # version 3 have none recorded: every base model then was a vision-language model.
    modalities: tuple[str, ...] = ("text", "image")
    # The decoder layer each head layer index refers to, where some decoder layers have no
    # self-attention (Mllama's cross-attention layers); None: layer i is decoder layer i.
    layer_ids: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {**dataclasses.asdict(self), "modalities": list(self.modalities)}
        if self.layer_ids is None:
            del d["layer_ids"]  # absent means the identity (schema_version 3)
        else:
            d["layer_ids"] = list(self.layer_ids)
        return d

    @property
    def takes_images(self) -> bool:
        return "image" in self.modalities

    @property
    def text_only_reason(self) -> str:
        """Why an input with images is refused, for a text-only base model's messages."""
        return (
            f"the base model {self.name_or_path} takes text only (its checkpoint has a "
            "tokenizer and no image processor)"
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaseModelInfo:
        return cls(
            name_or_path=d["name_or_path"],
            revision=d["revision"],
            architecture=d["architecture"],
            num_layers=int(d["num_layers"]),
            num_heads=int(d["num_heads"]),
            head_dim=int(d["head_dim"]),
            dtype=d["dtype"],
            modalities=tuple(d.get("modalities", ("text", "image"))),
            layer_ids=tuple(int(i) for i in d["layer_ids"]) if "layer_ids" in d else None,
        )

    @property
    def decoder_layers(self) -> tuple[int, ...]:
        """The decoder layer of each head layer index: [num_layers]."""
        return self.layer_ids if self.layer_ids is not None else tuple(range(self.num_layers))

    def describe(self) -> str:
        return (
            f"{self.name_or_path} (revision {self.revision or 'unknown'}, {self.architecture}, "
            f"{self.num_layers} layers x {self.num_heads} heads x head_dim {self.head_dim})"
        )

    def check_compatible(self, other: BaseModelInfo) -> None:
        """Refuse `other` unless it has this architecture and geometry, and the same revision.

        `name_or_path` and `dtype` may differ: the same checkpoint can be loaded from a mirror
        path or in another dtype. A revision is compared only when both sides state one, since
        None means "unknown" (a local directory has no hub revision); a stated revision that
        differs is refused, because heads are not comparable across checkpoints.
        """
        diffs = [
            f"{name} {getattr(self, name)!r} != {getattr(other, name)!r}"
            for name in ("architecture", "num_layers", "num_heads", "head_dim")
            if getattr(self, name) != getattr(other, name)
        ]
        if self.decoder_layers != other.decoder_layers:
            diffs.append(
                f"head layers are decoder layers {list(self.decoder_layers)} != "
                f"{list(other.decoder_layers)}"
            )
        if self.revision is not None and other.revision is not None:
            if self.revision != other.revision:
                diffs.append(f"revision {self.revision!r} != {other.revision!r}")
        if diffs:
            raise ArtifactError(
                f"the SAV artifact was fitted on {self.describe()}, but the base model is "
                f"{other.describe()}: {'; '.join(diffs)}. Load the base model the artifact was "
                "fitted on, or re-fit the artifact on this model"
            )


@dataclass(frozen=True)
class Selection:
    """How the heads were chosen; `scores` are the selected heads' scores, in heads order."""

    method: str  # "paper" | "loo"
    k: int
    examples_per_class: dict[str, int]
    scores: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "k": self.k,
            "examples_per_class": dict(self.examples_per_class),
            "scores": list(self.scores),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Selection:
        return cls(
            method=d["method"],
            k=int(d["k"]),
            examples_per_class={str(k): int(v) for k, v in d["examples_per_class"].items()},
            scores=[float(s) for s in d["scores"]],
        )


@dataclass(frozen=True)
class Calibration:
    """How the probabilities are made: softmax over classes of the selected heads' mean cosine
    similarity divided by `temperature`, fitted on the training set's leave-one-out
    similarities (sav_ray/core/calibration.py)."""

    temperature: float
    loo_log_loss: float  # mean, at this temperature
    loo_accuracy: float  # of the vote, leave-one-out
    method: str = "softmax_mean_cosine"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(
            temperature=float(d["temperature"]),
            loo_log_loss=float(d["loo_log_loss"]),
            loo_accuracy=float(d["loo_accuracy"]),
            method=d["method"],
        )


@dataclass(eq=False)
class SavArtifact:
    """A fitted SAV classifier. Compare fields, not artifacts: the arrays have no `==`."""

    labels: list[str]  # centroid order
    heads: np.ndarray  # [k, 2] int64 (layer, head), best first
    centroids: np.ndarray  # [C, k, D] float32
    base_model: BaseModelInfo
    prompt: PromptConfig
    selection: Selection
    head_scores: np.ndarray | None = None  # [L, H] float32/float64
    preprocessing: Preprocessing = Preprocessing()  # image resolution limits; reused at inference
    # What the fit's processor made of `preprocessing` (resolution_plan(...).applied): a record.
    preprocessing_applied: dict[str, Any] = field(default_factory=nothing_applied)
    # schema_version 4: probabilities (None: vote shares only, as versions 1-3), the label rule
    # ("vote" or "probability") and an optional threshold on one label's probability
    calibration: Calibration | None = None
    decision: str = "vote"
    threshold: Threshold | None = None
    created_at: str = ""  # ISO-8601 UTC; set by the writer if empty
    package_version: str = ""  # set by the writer if empty
    schema_version: int = SCHEMA_VERSION
    sha256: dict[str, str] = field(default_factory=dict)  # tensor file name -> hex digest
    _digest: str = field(default="", init=False, repr=False)

    @property
    def digest(self) -> str:
        """SHA-256 hex of the sav.json bytes: the artifact hash (it covers the tensor hashes)."""
        if not self._digest:
            raise ArtifactError(
                "this SavArtifact has no digest yet: its digest is the hash of sav.json, "
                "so write it with write_artifact() or load it with load_artifact() first"
            )
        return self._digest

    @property
    def deepest_layer(self) -> int:
        return int(self.heads[:, 0].max())


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The JSON Schema of sav.json: the repo's copy in a checkout, the packaged copy otherwise."""
    for path in (
        Path(__file__).parents[2] / "artifacts_schema" / SCHEMA_FILE,
        Path(__file__).parents[1] / "schema" / SCHEMA_FILE,
    ):
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    raise FileNotFoundError(
        f"{SCHEMA_FILE} is neither in artifacts_schema/ nor in sav_ray/schema/; "
        "the sav-ray installation is incomplete, reinstall it"
    )


def write_artifact(
    artifact: SavArtifact, out_dir: str | Path, *, overwrite: bool = False
) -> SavArtifact:
    """Validate `artifact` and write it to `out_dir` atomically; return it with hashes filled.

    Everything is validated and serialised in memory before the first byte is written. Files go
    to a temporary sibling directory, are fsynced, and the directory is renamed into place, so
    `out_dir` holds a complete artifact or nothing. An existing non-empty `out_dir` is refused
    unless `overwrite` is set, and even then only if it is an artifact (holds sav.json).
    """
    out_dir = Path(out_dir)
    where = f"SAV artifact for {out_dir}"
    if artifact.schema_version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{where}: schema_version {artifact.schema_version!r} cannot be written; "
            f"this sav-ray writes schema_version {SCHEMA_VERSION}"
        )
    heads, centroids, head_scores = _normalized_arrays(artifact, where)

    tensors = {CENTROIDS_FILE: centroids}
    if head_scores is not None:
        tensors[HEAD_SCORES_FILE] = head_scores
    blobs = {
        name: safetensors.numpy.save({_TENSOR_NAMES[name]: array})
        for name, array in tensors.items()
    }
    files = {
        name: {
            "sha256": hashlib.sha256(blobs[name]).hexdigest(),
            "tensor": _TENSOR_NAMES[name],
            "dtype": tensors[name].dtype.name,
            "shape": list(tensors[name].shape),
        }
        for name in tensors
    }
    doc = _to_plain(
        {
            "schema_version": SCHEMA_VERSION,
            "labels": artifact.labels,
            "heads": heads.tolist(),
            "base_model": artifact.base_model.to_dict(),
            "prompt": artifact.prompt.to_dict(),
            "preprocessing": {
                **artifact.preprocessing.to_dict(),
                "applied": artifact.preprocessing_applied,
            },
            "selection": artifact.selection.to_dict(),
            "decision": artifact.decision,
            **({"calibration": artifact.calibration.to_dict()} if artifact.calibration else {}),
            **({"threshold": artifact.threshold.to_dict()} if artifact.threshold else {}),
            "files": files,
            "created_at": artifact.created_at
            or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "package_version": artifact.package_version or __version__,
        }
    )
    _validate_doc(doc, where)
    try:
        text = json.dumps(doc, sort_keys=True, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: sav.json cannot be written as JSON: {e}") from e
    blobs[ARTIFACT_FILE] = text.encode("utf-8")

    _check_destination(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_files(tmp, blobs)
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out_dir.parent)

    written = dataclasses.replace(
        artifact,
        heads=heads,
        centroids=centroids,
        head_scores=head_scores,
        created_at=doc["created_at"],
        package_version=doc["package_version"],
        sha256={name: entry["sha256"] for name, entry in files.items()},
    )
    written._digest = hashlib.sha256(blobs[ARTIFACT_FILE]).hexdigest()
    return written


def load_artifact(path: str | Path, expect: BaseModelInfo | None = None) -> SavArtifact:
    """Load the artifact in directory `path` (or its sav.json), verifying everything it states.

    Checks, in order: schema_version is supported, sav.json matches the schema and is
    consistent, each tensor file's SHA-256, the tensors' names, dtypes and shapes, and, when
    `expect` (the base model about to be used) is given, that it matches the artifact's.
    """
    path = Path(path)
    if path.name == ARTIFACT_FILE and path.is_file():
        path = path.parent
    if not path.is_dir():
        raise ArtifactError(f"SAV artifact directory {path} does not exist or is not a directory")
    doc_path = path / ARTIFACT_FILE
    where = str(doc_path)
    raw = _read(doc_path)
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise ArtifactError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ArtifactError(f"{where} must hold a JSON object, not {type(doc).__name__}")
    version = doc.get("schema_version")
    if version is None:
        raise ArtifactError(f"{where} has no schema_version; it was not written by sav-ray")
    if version not in SUPPORTED_SCHEMA_VERSIONS or isinstance(version, bool):
        raise ArtifactError(
            f"{where} has schema_version {version!r}, which sav-ray {__version__} cannot read "
            f"(supported: {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); "
            "use the sav-ray version that wrote it, or re-fit the artifact"
        )
    _validate_doc(doc, where)

    arrays = {}
    for name, entry in doc["files"].items():
        file_path = path / name
        blob = _read(file_path)
        actual = hashlib.sha256(blob).hexdigest()
        if actual != entry["sha256"]:
            raise ArtifactError(
                f"{file_path}: SHA-256 {actual} does not match {entry['sha256']} recorded in "
                f"{ARTIFACT_FILE}; the file is corrupt or was changed after writing. "
                "Restore the artifact from its source (e.g. the registry) or re-fit it"
            )
        try:
            loaded = safetensors.numpy.load(blob)
        except Exception as e:  # safetensors raises its own SafetensorError on bad headers
            raise ArtifactError(f"{file_path} is not a readable safetensors file: {e}") from e
        if set(loaded) != {entry["tensor"]}:
            raise ArtifactError(
                f"{file_path} holds tensors {sorted(loaded)}; expected only {entry['tensor']!r}"
            )
        array = loaded[entry["tensor"]]
        if array.dtype.name != entry["dtype"] or list(array.shape) != entry["shape"]:
            raise ArtifactError(
                f"{file_path}: tensor {entry['tensor']!r} is {array.dtype.name} "
                f"{list(array.shape)}, but {ARTIFACT_FILE} says {entry['dtype']} {entry['shape']}"
            )
        if not np.isfinite(array).all():
            raise ArtifactError(f"{file_path}: tensor {entry['tensor']!r} has NaN or inf values")
        arrays[name] = array

    artifact = SavArtifact(
        labels=list(doc["labels"]),
        heads=np.asarray(doc["heads"], dtype=np.int64).reshape(-1, 2),
        centroids=arrays[CENTROIDS_FILE],
        base_model=BaseModelInfo.from_dict(doc["base_model"]),
        prompt=PromptConfig.from_dict(doc["prompt"]),
        selection=Selection.from_dict(doc["selection"]),
        head_scores=arrays.get(HEAD_SCORES_FILE),
        preprocessing=Preprocessing.from_dict(doc.get("preprocessing")),
        preprocessing_applied=doc["preprocessing"]["applied"]
        if "preprocessing" in doc
        else nothing_applied(),
        calibration=Calibration.from_dict(doc["calibration"]) if "calibration" in doc else None,
        decision=doc.get("decision", "vote"),
        threshold=Threshold.from_dict(doc["threshold"]) if "threshold" in doc else None,
        created_at=doc["created_at"],
        package_version=doc["package_version"],
        schema_version=int(version),
        sha256={name: entry["sha256"] for name, entry in doc["files"].items()},
    )
    artifact._digest = hashlib.sha256(raw).hexdigest()
    if expect is not None:
        try:
            artifact.base_model.check_compatible(expect)
        except ArtifactError as e:
            raise ArtifactError(f"{path}: {e}") from None
    return artifact


def _normalized_arrays(
    artifact: SavArtifact, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """heads as int64 [k, 2], centroids as float32 [C, k, D], head_scores kept as float32/64."""
    heads = np.asarray(artifact.heads)
    if heads.ndim != 2 or heads.shape[1] != 2 or not np.issubdtype(heads.dtype, np.integer):
        raise ArtifactError(
            f"{where}: heads must be an integer array [k, 2] of (layer, head), "
            f"got {heads.dtype.name} {list(heads.shape)}"
        )
    heads = heads.astype(np.int64)

    centroids = np.asarray(artifact.centroids)
    if centroids.ndim != 3 or not np.issubdtype(centroids.dtype, np.floating):
        raise ArtifactError(
            f"{where}: centroids must be a float array [labels, heads, head_dim], "
            f"got {centroids.dtype.name} {list(centroids.shape)}"
        )
    # float32 is the file format; float64 sums from the reducer are narrowed here, once.
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)  # [C, k, D]
    if not np.isfinite(centroids).all():
        raise ArtifactError(
            f"{where}: centroids have NaN or inf values (a class with no examples, "
            "or an overflow in the reducer); fix the fit before writing"
        )

    head_scores = artifact.head_scores
    if head_scores is not None:
        head_scores = np.asarray(head_scores)
        if head_scores.ndim != 2 or head_scores.dtype not in (np.float32, np.float64):
            raise ArtifactError(
                f"{where}: head_scores must be a float32 or float64 array [layers, heads], "
                f"got {head_scores.dtype.name} {list(head_scores.shape)}"
            )
        head_scores = np.ascontiguousarray(head_scores)  # [L, H]
        if not np.isfinite(head_scores).all():
            raise ArtifactError(f"{where}: head_scores have NaN or inf values")
    return heads, centroids, head_scores


def _validate_doc(doc: dict[str, Any], where: str) -> None:
    """Schema validation, then the checks across fields that a JSON Schema cannot express."""
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        shown = "; ".join(f"at {_json_path(e.absolute_path)}: {e.message}" for e in errors[:5]) + (
            f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
        )
        raise ArtifactError(
            f"{where}: sav.json does not match the SAV artifact schema "
            f"(artifacts_schema/{SCHEMA_FILE}): {shown}"
        )

    model, selection, heads = doc["base_model"], doc["selection"], doc["heads"]
    problems = []
    for i, (layer, head) in enumerate(heads):
        if layer >= model["num_layers"] or head >= model["num_heads"]:
            problems.append(
                f"heads[{i}] = [{layer}, {head}] is outside the base model's "
                f"{model['num_layers']} layers x {model['num_heads']} heads"
            )
    layer_ids = model.get("layer_ids")
    if layer_ids is not None and len(layer_ids) != model["num_layers"]:
        problems.append(
            f"base_model.layer_ids has {len(layer_ids)} entries for {model['num_layers']} layers"
        )
    if selection["k"] != len(heads):
        problems.append(f"selection.k is {selection['k']} but there are {len(heads)} heads")
    scores = selection["scores"]
    if len(scores) != len(heads):
        problems.append(f"selection.scores has {len(scores)} entries for {len(heads)} heads")
    if any(scores[i] < scores[i + 1] for i in range(len(scores) - 1)):
        problems.append("selection.scores must be non-increasing: heads are listed best first")
    if doc.get("decision") == "probability" and "calibration" not in doc:
        raise ArtifactError(f"{where}: decision 'probability' needs a calibration")
    if "threshold" in doc and doc["threshold"]["positive_label"] not in doc["labels"]:
        raise ArtifactError(
            f"{where}: threshold.positive_label {doc['threshold']['positive_label']!r} is not "
            "one of the labels"
        )
    if set(selection["examples_per_class"]) != set(doc["labels"]):
        problems.append(
            f"selection.examples_per_class has keys {sorted(selection['examples_per_class'])}, "
            f"but the labels are {sorted(doc['labels'])}"
        )
    expected_shapes = {
        CENTROIDS_FILE: [len(doc["labels"]), len(heads), model["head_dim"]],
        HEAD_SCORES_FILE: [model["num_layers"], model["num_heads"]],
    }
    for name, entry in doc["files"].items():
        if entry["shape"] != expected_shapes[name]:
            problems.append(
                f"{_TENSOR_NAMES[name]} has shape {entry['shape']}, expected "
                f"{expected_shapes[name]} "
                + (
                    "(labels, heads, head_dim)"
                    if name == CENTROIDS_FILE
                    else "(num_layers, num_heads)"
                )
            )
    if problems:
        raise ArtifactError(f"{where}: " + "; ".join(problems))


def _json_path(path: Any) -> str:
    parts = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
    return parts.lstrip(".") or "the top level"


def _to_plain(obj: Any) -> Any:
    """numpy scalars and arrays to Python values, so JSON and the schema see plain types."""
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(
            f"{path} is missing; the artifact directory is incomplete, restore or re-fit it"
        ) from None


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise ArtifactError(f"{out_dir} exists and is not a directory; choose another output path")
    if not any(out_dir.iterdir()):
        return  # an empty directory holds nothing to lose; rename() replaces it atomically
    if not overwrite:
        raise ArtifactError(
            f"{out_dir} already exists; choose another output path or pass overwrite=True"
        )
    if not (out_dir / ARTIFACT_FILE).is_file():
        raise ArtifactError(
            f"refusing to overwrite {out_dir}: it is not a SAV artifact (no {ARTIFACT_FILE}); "
            "choose another output path or remove it yourself"
        )


def _write_files(directory: Path, blobs: dict[str, bytes]) -> None:
    for name, blob in blobs.items():
        with open(directory / name, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(directory)


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """rename() is atomic within one filesystem; an old artifact is moved aside, then deleted."""
    if not (overwrite and out_dir.is_dir() and any(out_dir.iterdir())):
        os.rename(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old)  # replaces the empty placeholder `old`
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
