"""Image resolution: `--min-image-pixels` / `--max-image-pixels` mapped onto each processor's knobs.

Resolution changes the vectors, so the limits are part of an artifact's preprocessing config
(recorded by the fit, reused by predict, evaluate, the MLflow model and the server). The limits
are applied per processor call, so one loaded processor serves artifacts with different ones:
- Pixel-budget processors (Qwen2-VL, Qwen2.5-VL: the image processor takes `min_pixels` /
  `max_pixels`, held as `size={"shortest_edge", "longest_edge"}` in pixels, and resizes every
  image into that range): the limits replace those two bounds (`size=` call argument).
- Anyres tiling processors (LLaVA-OneVision: `image_grid_pinpoints`): an image over
  `max_image_pixels` is downscaled, aspect ratio kept, before the processor sees it, so it
  picks a smaller tile grid. Restricting the pinpoints instead would need the same change on the
  processor's token count and on the model's config (which unpads the tiles with its own list),
  so it cannot be done per call; a smaller image gives the processor and the model the same
  `image_sizes`. `min_image_pixels` does not apply (the base tile is always there).
- Fixed-size processors (LLaVA-1.5's CLIP, Gemma3's SigLIP): untouched; a note says a limit
  given does not apply.

    plan = resolution_plan(processor, Preprocessing(max_image_pixels=448 * 448))
    plan.call_kwargs, plan.max_image_area, plan.applied
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from sav_ray.core.errors import ConfigError
from sav_ray.core.prompts import VIDEO_INPUTS

logger = logging.getLogger(__name__)


DEFAULT_VIDEO_FRAMES = 8


@dataclass(frozen=True)
class Preprocessing:
    """Image resolution limits, in pixels per image (None keeps the processor's default), and
    how videos are given: `video_frames` frames sampled uniformly (`sav_ray.core.video`), as the
    processor's native video input or as images (`video_input`; None: decided from the
    processor, which the fit does once and records)."""

    min_image_pixels: int | None = None
    max_image_pixels: int | None = None
    video_frames: int = DEFAULT_VIDEO_FRAMES
    video_input: str | None = None

    def __post_init__(self) -> None:
        for flag, value in (
            ("--min-image-pixels", self.min_image_pixels),
            ("--max-image-pixels", self.max_image_pixels),
        ):
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ConfigError(f"{flag} {value}: must be a positive number of pixels")
        low, high = self.min_image_pixels, self.max_image_pixels
        if low is not None and high is not None and low > high:
            raise ConfigError(
                f"--min-image-pixels {low} is above --max-image-pixels {high}; "
                "give a minimum at most the maximum"
            )
        if isinstance(self.video_frames, bool) or not isinstance(self.video_frames, int):
            raise ConfigError(f"--video-frames {self.video_frames!r}: must be a whole number")
        if self.video_frames < 1:
            raise ConfigError(f"--video-frames {self.video_frames}: must be at least 1")
        if self.video_input is not None and self.video_input not in VIDEO_INPUTS:
            raise ConfigError(f"video_input {self.video_input!r}: must be one of {VIDEO_INPUTS}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Preprocessing:
        """From an artifact or vectors sidecar; None (written before limits existed): defaults.
        Written before videos existed: `DEFAULT_VIDEO_FRAMES`, input decided by the processor."""
        d = d or {}
        return cls(
            min_image_pixels=d.get("min_image_pixels"),
            max_image_pixels=d.get("max_image_pixels"),
            video_frames=d.get("video_frames", DEFAULT_VIDEO_FRAMES),
            video_input=d.get("video_input"),
        )


NO_LIMITS = Preprocessing()  # the processor's own resolution


@dataclass(frozen=True)
class ResolutionPlan:
    """How a processor applies a `Preprocessing`."""

    call_kwargs: dict[str, Any] = field(default_factory=dict)  # for the processor call
    max_image_area: int | None = None  # downscale larger images to this many pixels first
    applied: dict[str, Any] = field(default_factory=dict)  # recorded in the artifact
    notes: tuple[str, ...] = ()  # limits asked for that this processor does not take


def resolution_plan(processor: Any, prep: Preprocessing) -> ResolutionPlan:
    """Map the limits onto `processor`'s own knobs (see the module docstring)."""
    image_processor = getattr(processor, "image_processor", None)
    name = type(image_processor).__name__ if image_processor is not None else None
    asked = {
        k: v
        for k, v in (
            ("min_image_pixels", prep.min_image_pixels),
            ("max_image_pixels", prep.max_image_pixels),
        )
        if v is not None
    }
    settings: dict[str, Any] = {}
    call_kwargs: dict[str, Any] = {}
    max_area = None
    unused: list[str] = []
    if image_processor is None:
        unused = list(asked)
        why = "the processor takes no images"
    elif getattr(image_processor, "image_grid_pinpoints", None):
        max_area = prep.max_image_pixels
        if max_area is not None:
            settings["max_image_area"] = max_area
        unused = [k for k in asked if k == "min_image_pixels"]
        why = "anyres tiling always keeps its base tile"
    elif "max_pixels" in getattr(
        getattr(image_processor, "valid_kwargs", None), "__annotations__", {}
    ):
        if asked:
            size = image_processor.size
            low = prep.min_image_pixels or size.shortest_edge
            high = prep.max_image_pixels or size.longest_edge
            # One limit alone may cross the processor's other default bound: it wins.
            if prep.min_image_pixels is None:
                low = min(low, high)
            if prep.max_image_pixels is None:
                high = max(low, high)
            call_kwargs["size"] = {"shortest_edge": int(low), "longest_edge": int(high)}
            settings["size"] = dict(call_kwargs["size"])
        why = ""
    else:
        unused = list(asked)
        why = "it resizes every image to a fixed size"
    notes = tuple(
        f"--{k.replace('_', '-')} {asked[k]} does not apply to {name or 'this processor'}: {why}; "
        "images are processed at its default resolution"
        for k in unused
    )
    applied = {"image_processor": name, "settings": settings, "notes": list(notes)}
    return ResolutionPlan(call_kwargs, max_area, applied, notes)


def nothing_applied() -> dict[str, Any]:
    """The record of preprocessing at the processor's defaults (artifacts and sidecars from
    before resolution limits existed)."""
    return {"image_processor": None, "settings": {}, "notes": []}


def warn_unused(plan: ResolutionPlan) -> None:
    """One warning line per limit the processor does not take."""
    for note in plan.notes:
        logger.warning("warning: %s", note)


def limit_area(images: list, max_area: int | None) -> list:
    """Images over `max_area` pixels downscaled (aspect ratio kept, bicubic) to at most it."""
    if max_area is None:
        return images
    out = []
    for img in images:
        width, height = img.size
        if width * height <= max_area:
            out.append(img)
            continue
        scale = math.sqrt(max_area / (width * height))
        size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
        out.append(img.resize(size, resample=3))  # 3: PIL's BICUBIC
    return out
