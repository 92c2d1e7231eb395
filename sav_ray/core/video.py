"""Video decoding with limits: a video file or its bytes -> N frames sampled uniformly (PyAV).

Fitting (manifest video files), predict, the MLflow model and the server (uploaded bytes) all
decode through `decode_video`, so a model sees the same frames everywhere.

Uniform sampling. A video of T decoded frames (indices 0..T-1) gives N frames at

    index_i = floor(i * (T - 1) / (N - 1) + 1/2)     for i = 0 .. N-1   (N >= 2)
    index_0 = floor((T - 1) / 2)                      (N == 1: the middle frame)

that is, N points evenly spaced from the first frame to the last, each rounded to the nearest
frame (halves up); `sample_indices` computes it in integers. With T < N some frames repeat, so
a row always has exactly N frames and every prompt of a classifier the same shape.

Only the containers of `VIDEO_SUFFIXES` are opened, and the container is recognised from its
first bytes and named to FFmpeg explicitly, so FFmpeg never probes untrusted data with its other
demuxers (playlist formats such as HLS would open further files or URLs). Untrusted input is
bounded before and while decoding: encoded bytes, pixels per frame and duration from the header,
then the count of decoded frames and their timestamps (`VideoLimits`).

T is counted by decoding the video once; the sampled frames come from a second decode that
stops at the last one needed, so memory holds N frames, never the whole video.

    frames = load_video("clip.mp4", 8)            # [PIL.Image RGB] * 8, in time order
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sav_ray.core.images import read_local_file

# File suffixes a manifest's video field may name.
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")

# Whose container the first bytes show -> the FFmpeg demuxer that reads it.
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")


class VideoError(ValueError):
    """A video cannot be used; the message names the file (or request field) and why."""


class VideoTooLarge(VideoError):
    """The video is over a byte, pixel, frame or duration limit (a server answers 413)."""


@dataclass(frozen=True)
class VideoLimits:
    """Per-video limits: encoded bytes, pixels per frame, decoded frames, seconds."""

    max_bytes: int = 200 * 2**20
    max_pixels: int = 8_000_000
    max_frames: int = 20_000
    max_seconds: float = 3600.0

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels, self.max_frames, self.max_seconds) <= 0:
            raise ValueError(f"video limits must be positive, got {self}")


def sample_indices(total: int, n: int) -> list[int]:
    """The N frame indices of a T-frame video (module docstring): evenly spaced, ends kept."""
    if total < 1 or n < 1:
        raise ValueError(f"sample_indices needs total >= 1 and n >= 1, got {total}, {n}")
    if n == 1:
        return [(total - 1) // 2]
    return [(2 * i * (total - 1) + (n - 1)) // (2 * (n - 1)) for i in range(n)]


def container_format(head: bytes) -> str | None:
    """The FFmpeg demuxer for a file starting with `head` (16 bytes suffice), or None."""
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska and WebM
        return "matroska"
    if head[4:8] in _MP4_BOXES:  # ISO base media (MP4) and QuickTime (MOV)
        return "mov"
    return None


def load_video(path: str | Path, n: int, limits: VideoLimits = VideoLimits()) -> list[Image.Image]:
    """Read a video file and sample `n` frames uniformly (see `decode_video`)."""
    what = f"video file {path}"
    data = read_local_file(path, what, lambda size: _check_bytes(size, limits, what), VideoError)
    return decode_video(data, n, limits, what=what)


def decode_video(
    data: bytes, n: int, limits: VideoLimits = VideoLimits(), *, what: str = "video"
) -> list[Image.Image]:
    """`n` RGB frames sampled uniformly from an encoded video (module docstring), in order.

    `what` names the video in error messages (a file, or a request field such as
    "inputs[0].video").
    """
    import av

    if not data:
        raise VideoError(f"{what}: empty (0 bytes); send the encoded video file")
    _check_bytes(len(data), limits, what)
    fmt = container_format(data[:16])
    if fmt is None:
        raise VideoError(
            f"{what}: not a video in a supported container "
            f"({', '.join(s[1:] for s in VIDEO_SUFFIXES)})"
        )
    try:
        total = _count_frames(data, fmt, limits, what)
        wanted = sample_indices(total, n)
        kept = _decode_at(data, fmt, wanted)
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{what}: cannot be decoded, the data is corrupt ({e})") from None
    if len(kept) != len(set(wanted)):
        raise VideoError(f"{what}: decoding gave fewer frames the second time; the data is corrupt")
    return [kept[i] for i in wanted]


def _decode_at(data: bytes, fmt: str, wanted: list[int]) -> dict[int, Image.Image]:
    """Frame index -> RGB image for the `wanted` indices; decoding stops after the last."""
    import av

    kept: dict[int, Image.Image] = {}
    with av.open(io.BytesIO(data), format=fmt) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if index in wanted:
                kept[index] = frame.to_image()  # RGB
            if index >= wanted[-1]:
                break
    return kept


def _count_frames(data: bytes, fmt: str, limits: VideoLimits, what: str) -> int:
    """Decode once, counting frames; refuse the video as soon as it is over a limit."""
    import av

    with av.open(io.BytesIO(data), format=fmt) as container:
        if not container.streams.video:
            raise VideoError(f"{what}: has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > limits.max_pixels:
            raise VideoTooLarge(
                f"{what}: {width}x{height} is {width * height} pixels per frame, over the limit "
                f"of {limits.max_pixels}; scale the video down"
            )
        if container.duration is not None:
            _check_seconds(container.duration / av.time_base, limits, what)
        total = 0
        for frame in container.decode(stream):
            total += 1
            if total > limits.max_frames:
                raise VideoTooLarge(
                    f"{what}: more than {limits.max_frames} frames, over the limit; send a "
                    "shorter clip or one at a lower frame rate"
                )
            if frame.time is not None:
                _check_seconds(frame.time, limits, what)
    if total == 0:
        raise VideoError(f"{what}: has no decodable frames")
    return total


def _check_seconds(seconds: float, limits: VideoLimits, what: str) -> None:
    if seconds > limits.max_seconds:
        raise VideoTooLarge(
            f"{what}: {seconds:.1f} s long, over the limit of {limits.max_seconds:g} s; "
            "send a shorter clip"
        )


def _check_bytes(size: int, limits: VideoLimits, what: str) -> None:
    if size > limits.max_bytes:
        raise VideoTooLarge(
            f"{what}: {size} bytes, over the limit of {limits.max_bytes} bytes per video; "
            "send a shorter or smaller clip"
        )
