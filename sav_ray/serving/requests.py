"""Online classification core, without Ray: request inputs -> Examples -> predictions.

The Serve deployments in `serve/app.py` are thin around this module:
- `to_examples` turns a request's inputs (text + image strings + an optional video string) into
  `Example`s. Images are base64 (or `data:` URIs) by default; `file://` paths and http(s) URLs
  are read only under a configured allowlist (`ImageSources`). A video is base64 (or a `data:`
  URI) only, decoded into the artifact's number of uniformly sampled frames (`sav_ray.core.video`).
  Sizes are bounded before decoding (`RequestLimits`), a video's frames and duration while it
  is decoded.
- `resolve_ref` maps a served model's reference (an artifact folder, `models:/NAME@ALIAS`,
  `models:/NAME/VERSION`) to an immutable model id: a registry version, or a folder pinned
  by the SHA-256 of its sav.json. A moved alias or a rewritten folder gives a new id.
- `encode_example` runs the processor on one input, once per distinct prompt of the artifacts
  it is for (the server does this in the Ingress, so the model's replica only pads and runs).
- `classify_shared` runs one batched forward pass for a batch of encoded inputs, each naming its
  own artifacts on the one base model (the union of their heads, to the deepest layer any
  needs); if the batch fails on one input, each input is retried alone so only that one fails.
- `BatchStats` (and `sav_ray.core.capture.LayerCounter`) count what ran, for `GET /v1/stats`.

Every error a client can cause is a `RequestError` carrying its HTTP status.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sav_ray.core.artifact import ARTIFACT_FILE, SavArtifact
from sav_ray.core.classify import Prediction, input_key, input_key_of, predict_shared
from sav_ray.core.images import (
    ImageError,
    ImageLimits,
    ImageTooLarge,
    check_image_bytes,
    decode_image,
    image_pixels,
)
from sav_ray.core.model_inputs import encode_row
from sav_ray.core.models import LoadedModel
from sav_ray.core.prompts import Example, PromptConfig, PromptError
from sav_ray.core.resolution import DEFAULT_VIDEO_FRAMES, Preprocessing
from sav_ray.core.video import VideoError, VideoLimits, VideoTooLarge, decode_video
from sav_ray.serving.fetch import (
    FetchError,
    FetchTooLarge,
    UrlPrefix,
    UrlRefused,
    allowed_url,
    download,
)
from sav_ray.tracking.registry import is_registry_ref, parse_ref

UPLOAD_PREFIX = "part:"  # an image written `part:NAME` is the multipart request's file part NAME
_WHITESPACE = re.compile(rb"\s+")
_DATA_URI = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,", re.ASCII)


class RequestError(ValueError):
    """A client's mistake, with the HTTP status it maps to and a message naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self):  # keep `status` when pickled across processes
        return (type(self), (self.status, self.message))


@dataclass(frozen=True)
class RequestLimits:
    """Limits on one request. Body size, counts and text length are enforced by the HTTP layer
    (serve/app.py, serve/schemas.py: they appear in /openapi.json); image bytes and pixels, and
    a video's bytes, pixels per frame (`max_image_pixels`), decoded frames and seconds by
    `to_examples`."""

    max_body_bytes: int = 32 * 2**20
    max_inputs: int = 32
    max_models_per_request: int = 8  # names in one request's "models"
    max_images_per_input: int = 8
    max_text_chars: int = 8_000
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 16_000_000  # per image, read from the header before decoding
    max_request_pixels: int = 32_000_000  # all images and sampled frames of a request
    max_request_fetch_bytes: int = 32 * 2**20  # all images one request downloads (URLs)
    max_video_bytes: int = 20 * 2**20
    max_video_frames: int = 1_800  # frames decoded to count them (bounds decoding work)
    max_video_seconds: int = 120

    def __post_init__(self) -> None:
        bad = [f"{k}={v}" for k, v in vars(self).items() if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"request limits must be positive integers: {', '.join(bad)}")

    @property
    def image(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    @property
    def video(self) -> VideoLimits:
        return VideoLimits(
            max_bytes=self.max_video_bytes,
            max_pixels=self.max_image_pixels,
            max_frames=self.max_video_frames,
            max_seconds=self.max_video_seconds,
        )

    @property
    def max_image_chars(self) -> int:
        """Longest image string: the base64 of `max_image_bytes`, room for a data: prefix and
        line breaks."""
        return _base64_chars(self.max_image_bytes)

    @property
    def max_video_chars(self) -> int:
        """Longest video string: the base64 of `max_video_bytes`, as `max_image_chars`."""
        return _base64_chars(self.max_video_bytes)


def _base64_chars(max_bytes: int) -> int:
    encoded = 4 * -(-max_bytes // 3)
    return encoded + encoded // 64 + 256


@dataclass(frozen=True)
class ImageSources:
    """Where images may come from besides base64. Empty allowlists (the default) allow nothing.

    `allowed_paths`: directories whose files may be named as `file:///abs/path` (symlinks and
    `..` are resolved before the check). `allowed_url_prefixes`: URL prefixes such as
    `https://images.example.com/` that may be fetched, compared on scheme, host, port and whole
    path segments after normalising (`sav_ray.serving.fetch`; redirects are not followed).
    `url_timeout_s` bounds each wait for data, `url_deadline_s` one image's whole download and
    `request_fetch_s` all downloads of one request.
    """

    allowed_paths: tuple[str, ...] = ()
    allowed_url_prefixes: tuple[str, ...] = ()
    url_timeout_s: float = 10.0
    url_deadline_s: float = 15.0
    request_fetch_s: float = 30.0

    def __post_init__(self) -> None:
        for p in self.allowed_paths:
            if not Path(p).is_absolute():
                raise ValueError(f"image_sources.allowed_paths: {p!r} must be an absolute path")
        for u in self.allowed_url_prefixes:
            if not re.match(r"^https?://[^/]+/", u):
                raise ValueError(
                    f"image_sources.allowed_url_prefixes: {u!r} must be an http(s) URL with a "
                    "host and a path, e.g. 'https://images.example.com/'"
                )
            UrlPrefix.parse(u)  # raises naming the prefix
        for name in ("url_timeout_s", "url_deadline_s", "request_fetch_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"image_sources.{name} must be positive")

    @property
    def url_prefixes(self) -> tuple[UrlPrefix, ...]:
        return tuple(UrlPrefix.parse(u) for u in self.allowed_url_prefixes)


# Control characters: refused in every client string before it reaches a system call or the
# model. Text may hold tabs and line breaks; sources (paths, URLs) and names may not.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def refuse_control_characters(value: str, what: str, *, text: bool = False) -> None:
    """RequestError 400 naming `what` if `value` holds NUL or another control character
    (`text`: tabs and line breaks allowed)."""
    found = (_TEXT_CONTROL if text else _CONTROL).search(value)
    if found:
        raise RequestError(
            400,
            f"{what}: holds the control character U+{ord(found.group()):04X} at position "
            f"{found.start()}; remove it",
        )


def is_fetched(source: str | bytes) -> bool:
    """Whether an image source names a file or URL the server reads, rather than base64 or the
    raw bytes of an uploaded file."""
    return isinstance(source, str) and source.startswith(("http://", "https://", "file://"))


class FetchBudget:
    """What one request may still download: bytes and seconds, for all its images."""

    def __init__(self, sources: ImageSources, limits: RequestLimits) -> None:
        self.end = time.monotonic() + sources.request_fetch_s
        self.max_bytes = self.bytes_left = limits.max_request_fetch_bytes

    def spend(self, n: int, what: str) -> None:
        self.bytes_left -= n
        if self.bytes_left < 0:
            raise RequestError(
                413,
                f"{what}: the request's fetched images reach over {self.max_bytes} bytes, the "
                "limit per request; send fewer or smaller images",
            )


def image_bytes(
    source: str | bytes,
    sources: ImageSources,
    limits: RequestLimits,
    what: str,
    budget: FetchBudget | None = None,
) -> bytes:
    """The encoded image behind one image source: the file's bytes themselves (an upload), or a
    string: base64, data: URI, file:// path or URL."""
    if isinstance(source, bytes):  # its size is checked with its header (`image_pixels`)
        return source
    if is_fetched(source):
        refuse_control_characters(source, what)
    if source.startswith(("http://", "https://")):
        budget = budget or FetchBudget(sources, limits)
        data = _fetch(source, sources, limits, what, budget)
        budget.spend(len(data), what)
        return data
    if source.startswith("file://"):
        return _read_file(source, sources, limits, what)
    return _base64_bytes(source, what, "image", limits.max_image_bytes, "image.png")


def video_bytes(source: str, limits: RequestLimits, what: str) -> bytes:
    """The encoded video behind one video string: base64 or a base64 data: URI."""
    return _base64_bytes(source, what, "video", limits.max_video_bytes, "clip.mp4")


def _base64_bytes(source: str, what: str, kind: str, max_bytes: int, example: str) -> bytes:
    match = _DATA_URI.match(source)
    if match:
        if not match.group(3):
            mime = "image/png" if kind == "image" else "video/mp4"
            raise RequestError(400, f"{what}: a data: URI must be base64 (data:{mime};base64,...)")
        source = source[match.end() :]
    if len(source) > _base64_chars(max_bytes):
        raise RequestError(
            413,
            f"{what}: {len(source)} characters of base64, over the limit of "
            f"{max_bytes} bytes per {kind}; "
            + ("compress or resize the image" if kind == "image" else "send a shorter clip"),
        )
    try:
        data = base64.b64decode(_WHITESPACE.sub(b"", source.encode("ascii")), validate=True)
    except (UnicodeEncodeError, binascii.Error) as e:
        raise RequestError(
            400,
            f"{what}: not valid base64 ({e}); send the {kind} file's bytes in standard base64 "
            f"(e.g. `base64 -w0 {example}`)",
        ) from None
    return data


def _fetch(
    url: str, sources: ImageSources, limits: RequestLimits, what: str, budget: FetchBudget
) -> bytes:
    allowed = (
        f"; send the image as base64 or use a URL under {list(sources.allowed_url_prefixes)}"
        if sources.allowed_url_prefixes
        else "; send the image as base64"
    )
    if not sources.allowed_url_prefixes:
        raise RequestError(400, f"{what}: image URLs are not accepted by this server{allowed}")
    try:
        parsed = allowed_url(url, sources.url_prefixes)
    except UrlRefused as e:
        # from the URL alone, before any request: the same answer whether or not it exists
        raise RequestError(400, f"{what}: this URL is not accepted: {e}{allowed}") from None
    seconds = min(sources.url_deadline_s, budget.end - time.monotonic())
    try:
        return download(
            parsed,
            max_bytes=min(limits.max_image_bytes, max(budget.bytes_left, 0)),
            seconds=seconds,
            read_timeout=sources.url_timeout_s,
        )
    except FetchTooLarge as e:
        raise RequestError(413, f"{what}: fetching {parsed.normalised()} failed: {e}") from None
    except FetchError as e:
        raise RequestError(400, f"{what}: fetching {parsed.normalised()} failed: {e}") from None


def _read_file(uri: str, sources: ImageSources, limits: RequestLimits, what: str) -> bytes:
    path = Path(uri.removeprefix("file://"))
    if not sources.allowed_paths:
        raise RequestError(
            400, f"{what}: file:// images are not accepted by this server; send base64"
        )
    if not path.is_absolute():
        raise RequestError(400, f"{what}: {uri} must be an absolute path, file:///dir/image.png")
    real = path.resolve()
    if not any(real.is_relative_to(Path(root).resolve()) for root in sources.allowed_paths):
        raise RequestError(
            400, f"{what}: {uri} is outside the allowed folders {list(sources.allowed_paths)}"
        )
    try:
        size = real.stat().st_size
        _check_size(size, limits, what)
        return real.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise RequestError(400, f"{what}: {uri} is not a file on the server") from None
    except OSError as e:
        raise RequestError(400, f"{what}: {uri} cannot be read ({e.strerror})") from None


def _check_size(size: int, limits: RequestLimits, what: str) -> None:
    """413 naming `what` for a file over `max_image_bytes`, before it is read."""
    with _as_request_error(ImageTooLarge, ImageError):
        check_image_bytes(size, limits.image, what)


def to_examples(
    inputs: Sequence[tuple[str, Sequence[str | bytes]]],
    limits: RequestLimits,
    sources: ImageSources = ImageSources(),
    videos: Sequence[str | None] = (),
    video_frames: int = DEFAULT_VIDEO_FRAMES,
    reserve: Callable[[int], None] | None = None,
) -> list[Example]:
    """Decode each input's images (strings as `image_bytes` reads them, or an uploaded file's
    bytes; bounded in bytes and pixels) and its video, if `videos`
    gives one (`video_frames` frames sampled uniformly; bytes, pixels per frame, frames and
    seconds bounded), into an Example named `inputs[i]`.

    In two passes: first every text is checked for control characters, every source is read
    (base64, file or download, bounded by `FetchBudget`), each image's pixel count is read from
    its header and each video's frames are sampled; the request's pixels are then bounded
    (`max_request_pixels`) and reserved at once with `reserve(pixels)`
    (`sav_ray.serving.admission.Lease.reserve`: all of a request or none, so requests never hold part
    of the budget while waiting for the rest); only then are the images decoded."""
    for i, (text, _) in enumerate(inputs):
        refuse_control_characters(text, f"inputs[{i}].text", text=True)
    budget = FetchBudget(sources, limits)
    videos = list(videos) + [None] * (len(inputs) - len(videos))
    encoded: list[list[tuple[str, bytes]]] = []  # [input][image] -> (field, encoded bytes)
    frames: list[list] = []  # [input] -> sampled video frames
    total = 0
    for i, ((_, images), video) in enumerate(zip(inputs, videos, strict=True)):
        frames.append(_video_frames(video, video_frames, limits, f"inputs[{i}].video"))
        if frames[-1]:
            total += sum(f.width * f.height for f in frames[-1])
            _check_request_pixels(total, limits, f"inputs[{i}].video")
        encoded.append([])
        for j, source in enumerate(images):
            what = f"inputs[{i}].images[{j}]"
            data = image_bytes(source, sources, limits, what, budget)
            total += _image_call(image_pixels, data, limits, what)
            _check_request_pixels(total, limits, what)
            encoded[-1].append((what, data))
    if reserve is not None and total:
        reserve(total)
    examples = []
    for i, (text, _) in enumerate(inputs):
        decoded = [_image_call(decode_image, data, limits, what) for what, data in encoded[i]]
        encoded[i] = []  # the encoded bytes are not needed once the pixels exist
        examples.append(Example(text=text, images=decoded, where=f"inputs[{i}]", video=frames[i]))
    return examples


@contextmanager
def _as_request_error(too_large: type[Exception], invalid: type[Exception]) -> Iterator[None]:
    """A decoder's errors as the client's: over a limit 413, anything else it refuses 400."""
    try:
        yield
    except too_large as e:
        raise RequestError(413, str(e)) from None
    except invalid as e:
        raise RequestError(400, str(e)) from None


def _image_call(fn: Callable[..., Any], data: bytes, limits: RequestLimits, what: str) -> Any:
    """`fn(data, limits.image, what=what)` (decode_image or image_pixels), errors as 413/400."""
    with _as_request_error(ImageTooLarge, ImageError):
        return fn(data, limits.image, what=what)


def _video_frames(video: str | None, n: int, limits: RequestLimits, what: str) -> list:
    if video is None:
        return []
    data = video_bytes(video, limits, what)
    with _as_request_error(VideoTooLarge, VideoError):
        return decode_video(data, n, limits.video, what=what)


def _check_request_pixels(total: int, limits: RequestLimits, what: str) -> None:
    if total > limits.max_request_pixels:
        raise RequestError(
            413,
            f"{what}: the request's images reach {total} pixels, over the "
            f"limit of {limits.max_request_pixels} per request; send fewer or "
            "smaller images per request",
        )


# --- which artifact a served name means ------------------------------------------------------

_DIGEST_SEP = "#sha256="


@dataclass(frozen=True)
class Resolved:
    """What a served model's reference points to now."""

    model_id: str  # immutable: `models:/NAME/VERSION`, or `/abs/folder#sha256=<sav.json hash>`
    version: str | None  # the registry version; None for a folder


def resolve_ref(ref: str, alias_version: Callable[[str, str], str]) -> Resolved:
    """Pin `ref` to an immutable model id; `alias_version(name, alias)` asks the registry."""
    if is_registry_ref(ref):
        name, alias, version = parse_ref(ref)
        if alias is not None:
            version = str(alias_version(name, alias))
        return Resolved(model_id=f"models:/{name}/{version}", version=version)
    folder = Path(ref).resolve()
    try:
        digest = hashlib.sha256((folder / ARTIFACT_FILE).read_bytes()).hexdigest()
    except OSError as e:
        raise ValueError(
            f"model reference {ref!r}: {folder / ARTIFACT_FILE} cannot be read ({e.strerror}); "
            "give an artifact folder, models:/NAME@ALIAS or models:/NAME/VERSION"
        ) from None
    return Resolved(model_id=f"{folder}{_DIGEST_SEP}{digest}", version=None)


def split_model_id(model_id: str) -> tuple[str, str | None]:
    """(reference to load, the sav.json SHA-256 it must have or None)."""
    if is_registry_ref(model_id) or _DIGEST_SEP not in model_id:
        return model_id, None
    ref, digest = model_id.rsplit(_DIGEST_SEP, 1)
    return ref, digest


# --- classification ---------------------------------------------------------------------------


Rows = dict[str, dict[str, torch.Tensor]]  # input_key -> one row of `encode_row`


def encode_example(
    processor: Any, example: Example, variants: Sequence[tuple[PromptConfig, Preprocessing]]
) -> Rows:
    """One input's model inputs, once per distinct (prompt, preprocessing) among `variants`
    (the artifacts a request names): input_key -> row. An input the prompt cannot hold (e.g.
    `<image>` count != images) or the processor refuses (e.g. an image too elongated) is a 422
    naming it."""
    rows: Rows = {}
    for prompt, prep in variants:
        key = input_key_of(prompt, prep)
        if key in rows:
            continue
        try:
            rows[key] = encode_row(processor, example, prompt, prep)
        except PromptError as e:
            raise RequestError(422, str(e)) from None
        except ValueError as e:
            raise RequestError(
                422, f"{example.where}: the model cannot take this input: {e}"
            ) from None
    return rows


def classify_shared(
    lm: LoadedModel,
    items: Sequence[tuple[Rows, Sequence[SavArtifact]]],
    seconds: dict[str, float] | None = None,
    where: Sequence[str] = (),
) -> tuple[list[list[Prediction] | RequestError], int]:
    """Classify a batch of inputs, each given as its encoded rows (`encode_example`) with the
    artifacts it names (all on `lm`'s base model), in ONE forward pass (`predict_shared`): an
    artifact reads the row of its `input_key`, so artifacts sharing a prompt share a row.
    Returns, per input, one Prediction per artifact it named (or its RequestError), and the
    number of forward rows run.

    If the batched pass fails with a ValueError, the batch is retried one input at a time and
    only the input that fails gets a 422 (named by `where[i]`). Other errors are server
    faults. `seconds` gets "forward" and "vote" added."""
    try:
        return _classify_shared(lm, items, seconds)
    except ValueError as e:
        if len(items) == 1:
            name = where[0] if where else "input"
            return [RequestError(422, f"{name}: the model cannot take this input: {e}")], 0
    results, rows = [], 0
    for i, item in enumerate(items):
        [result], n = classify_shared(lm, [item], seconds, where[i : i + 1])
        results.append(result)
        rows += n
    return results, rows


def _classify_shared(
    lm: LoadedModel,
    items: Sequence[tuple[Rows, Sequence[SavArtifact]]],
    seconds: dict[str, float] | None,
) -> tuple[list[list[Prediction] | RequestError], int]:
    artifacts: dict[int, SavArtifact] = {}  # id -> artifact, in order of first use
    keys: dict[int, str] = {}  # id -> input_key
    rows: list[dict[str, torch.Tensor]] = []
    row_of: dict[tuple[int, str], int] = {}  # (input, input_key) -> row
    reads: dict[int, list[tuple[int, int, int]]] = {}  # id -> [(input, position, row)]
    for i, (encoded, named) in enumerate(items):
        for j, artifact in enumerate(named):
            a = id(artifact)
            if a not in artifacts:
                artifacts[a], keys[a], reads[a] = artifact, input_key(artifact), []
            at = (i, keys[a])
            if at not in row_of:
                row_of[at] = len(rows)
                rows.append(encoded[keys[a]])
            reads[a].append((i, j, row_of[at]))
    per_artifact = predict_shared(
        lm,
        list(artifacts.values()),
        rows,
        [[row for _, _, row in reads[a]] for a in artifacts],
        seconds,
    )
    results: list[list[Any]] = [[None] * len(named) for _, named in items]
    for a, preds in zip(artifacts, per_artifact, strict=True):
        for (i, j, _), pred in zip(reads[a], preds, strict=True):
            results[i][j] = pred
    return results, len(rows)


@dataclass
class BatchStats:
    """What the classifier's batches held: inputs per batch, inputs per model id, how many
    distinct model ids shared a batch, forward rows run, inputs that failed alone, and the
    seconds spent encoding (processor), in the forward pass and voting."""

    sizes: Counter = field(default_factory=Counter)  # inputs in a batch -> batches
    inputs_per_model: Counter = field(default_factory=Counter)  # model id -> inputs
    models_per_batch: Counter = field(default_factory=Counter)  # distinct model ids -> batches
    forward_rows: int = 0
    input_errors: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def record(
        self, model_ids: Sequence[Sequence[str]], results: Sequence[Any], rows: int = 0
    ) -> None:
        """One batch: the model ids each input named, its results, the forward rows run."""
        self.sizes[len(results)] += 1
        self.inputs_per_model.update(m for named in model_ids for m in named)
        self.models_per_batch[len({m for named in model_ids for m in named})] += 1
        self.forward_rows += rows
        self.input_errors += sum(isinstance(r, RequestError) for r in results)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": sum(self.sizes.values()),
            "inputs": sum(self.sizes[k] * k for k in self.sizes),
            "max_batch_size": max(self.sizes, default=0),
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
            "inputs_per_model": dict(self.inputs_per_model),
            "models_per_batch": {str(k): v for k, v in sorted(self.models_per_batch.items())},
            "forward_rows": self.forward_rows,
            "input_errors": self.input_errors,
            "seconds": {k: round(v, 6) for k, v in sorted(self.seconds.items())},
        }
