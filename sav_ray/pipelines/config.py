"""Job configs: one typed object per job, validated once, logged whole to MLflow.

`FitConfig.from_args()` is the whole command line of `jobs/fit.py`; each check names the flag.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from sav_ray.core.artifact import BaseModelInfo
from sav_ray.core.errors import ConfigError
from sav_ray.core.manifest import ManifestFields
from sav_ray.core.prompts import PromptConfig
from sav_ray.core.reduce import SELECTION_METHODS
from sav_ray.core.resolution import DEFAULT_VIDEO_FRAMES, Preprocessing
from sav_ray.pipelines.logs import add_verbose_arg
from sav_ray.pipelines.placement import AUTO


@dataclass(frozen=True)
class ModelConfig:
    """Which frozen model, and how to place it."""

    model: str = ""
    revision: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device_map: str | None = None  # e.g. "auto" to spread one model over an actor's GPUs
    batch_size: int = 8
    actors: int | str = AUTO  # auto: as many as the cluster's GPUs hold; 1 on CPUs (placement)
    gpus_per_actor: float | str = AUTO  # auto: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    wait_for_resources: float = 0.0  # seconds to wait for a cluster to grow to the request

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, **given: Any) -> ModelConfig:
        """The config of `add_model_args`/`add_runtime_args` flags; `given` overrides them."""
        flags = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
        return cls(**{**flags, **given})


DECISIONS = ("vote", "probability")


def _int_or_auto(value: str) -> int | str:
    if value == AUTO:
        return AUTO
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number or auto") from None


@dataclass(frozen=True)
class FitConfig(ModelConfig):
    train: str = ""
    output: str = ""
    num_heads: int | str = 20  # or "auto": chosen by leave-one-out accuracy (calibration.py)
    selection: str = "paper"
    decision: str = "vote"  # the predicted label: "vote" (most votes) or "probability"
    positive_label: str | None = None  # binary / one-vs-rest: store a threshold on p(label)
    target_precision: float | None = None
    target_recall: float | None = None
    save_vectors: str | None = None
    from_vectors: str | None = None
    vectors_dtype: str = "float32"
    image_field: str = "image"
    text_field: str = "question"
    label_field: str = "label"
    id_field: str | None = None
    video_field: str | None = None  # None: the field `video`, where the manifest has it
    video_frames: int = DEFAULT_VIDEO_FRAMES
    text_template: str = "{text}"
    system_prompt: str | None = None
    chat_template: str | None = None  # a Jinja file, for checkpoints that have no chat template
    min_image_pixels: int | None = None
    max_image_pixels: int | None = None
    overwrite: bool = False
    register: str | None = None
    experiment: str = "sav-ray"
    tracking_uri: str | None = None  # MLflow store; None: MLFLOW_TRACKING_URI or data/mlflow

    @property
    def manifest_fields(self) -> ManifestFields:
        return ManifestFields.from_flags(
            image=self.image_field,
            text=self.text_field,
            label=self.label_field,
            id=self.id_field,
            video=self.video_field,
        )

    @property
    def prompt(self) -> PromptConfig:
        return PromptConfig(
            text_template=self.text_template,
            system_prompt=self.system_prompt,
            chat_template=read_chat_template(self.chat_template),
        )

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            min_image_pixels=self.min_image_pixels,
            max_image_pixels=self.max_image_pixels,
            video_frames=self.video_frames,
        )

    def validate(self) -> FitConfig:
        if not self.from_vectors and not (self.model and self.train):
            raise ConfigError("give --model and --train, or --from-vectors DIR")
        if not self.output and not self.register:
            raise ConfigError(
                "give --output DIR (an absolute path under `ray job submit`) or --register NAME"
            )
        if self.selection not in SELECTION_METHODS:
            raise ConfigError(f"--selection {self.selection!r}: choose one of {SELECTION_METHODS}")
        if self.num_heads != AUTO and (not isinstance(self.num_heads, int) or self.num_heads < 1):
            raise ConfigError(f"--num-heads {self.num_heads}: must be at least 1 (or auto)")
        if self.decision not in DECISIONS:
            raise ConfigError(f"--decision {self.decision!r}: choose one of {DECISIONS}")
        targets = [t for t in (self.target_precision, self.target_recall) if t is not None]
        if targets and not self.positive_label:
            raise ConfigError("--target-precision/--target-recall need --positive-label LABEL")
        if self.positive_label and len(targets) != 1:
            raise ConfigError(
                "--positive-label needs one of --target-precision P or --target-recall R"
            )
        if targets and not 0 < targets[0] <= 1:
            raise ConfigError(f"--target-precision/--target-recall {targets[0]}: must be in (0, 1]")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.actors != AUTO and self.actors < 1:
            raise ConfigError(f"--actors {self.actors}: must be at least 1 (or auto)")
        if self.vectors_dtype not in ("float32", "float16"):
            raise ConfigError(f"--vectors-dtype {self.vectors_dtype!r}: choose float32 or float16")
        if self.train and not Path(self.train).exists():
            raise ConfigError(f"--train {self.train}: no such file")
        if self.from_vectors and not Path(self.from_vectors).is_dir():
            raise ConfigError(f"--from-vectors {self.from_vectors}: no such directory")
        if self.from_vectors and self.chat_template:
            raise ConfigError(
                "--chat-template does not apply with --from-vectors: the vectors were taken with "
                "the prompt their sidecar records; drop the flag"
            )
        if self.from_vectors and self.video_frames != DEFAULT_VIDEO_FRAMES:
            raise ConfigError(
                "--video-frames does not apply with --from-vectors: the vectors were taken with "
                "the frames their sidecar records; drop the flag"
            )
        _ = self.prompt  # PromptConfig checks the template, read_chat_template the file
        _ = self.preprocessing  # and Preprocessing the image pixel limits and video frames
        if self.from_vectors and (self.min_image_pixels or self.max_image_pixels):
            raise ConfigError(
                "--min-image-pixels/--max-image-pixels do not apply with --from-vectors: the "
                "vectors were taken at the resolution their sidecar records; drop the flags"
            )
        return self

    def to_params(self) -> dict[str, Any]:
        """Flat params for MLflow (None as empty string)."""
        return {k: ("" if v is None else v) for k, v in asdict(self).items()}

    @classmethod
    def parser(cls, prog: str = "jobs/fit.py") -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(
            prog=prog,
            description="Fit a Sparse Attention Vector classifier on Ray and write its artifact.",
        )
        add_model_args(p)
        add_verbose_arg(p)
        p.add_argument(
            "--train", default="", help="labelled manifest: .jsonl, .json, .parquet or .csv"
        )
        p.add_argument(
            "--output",
            default="",
            help="artifact directory to write (absolute or URI under ray job submit)",
        )
        p.add_argument(
            "--num-heads",
            type=_int_or_auto,
            default=20,
            help="k: heads to keep (default 20), or auto: the k of 1, 2, 3, 5, 10, 20, 40, 80, "
            "160 and all heads with the best leave-one-out vote accuracy",
        )
        p.add_argument("--selection", default="paper", choices=SELECTION_METHODS)
        p.add_argument(
            "--decision",
            default="vote",
            choices=DECISIONS,
            help="the predicted label: the heads' vote (default) or the most probable class",
        )
        p.add_argument(
            "--positive-label",
            default=None,
            metavar="LABEL",
            help="binary or one-vs-rest: store a threshold on p(LABEL), chosen on the training "
            "set's leave-one-out probabilities to reach --target-precision or --target-recall; "
            "predictions then carry `decision` (p(LABEL) >= threshold)",
        )
        p.add_argument("--target-precision", type=float, default=None, metavar="P")
        p.add_argument("--target-recall", type=float, default=None, metavar="R")
        p.add_argument(
            "--save-vectors",
            default=None,
            metavar="DIR",
            help="also write the per-example vectors as Parquet",
        )
        p.add_argument(
            "--from-vectors",
            default=None,
            metavar="DIR",
            help="refit from saved vectors, without the model",
        )
        p.add_argument("--vectors-dtype", default="float32", choices=("float32", "float16"))
        add_manifest_args(p)
        add_video_frames_arg(p)
        p.add_argument(
            "--text-template", default="{text}", help="prompt text; {text} is the row's text"
        )
        p.add_argument("--system-prompt", default=None)
        p.add_argument(
            "--chat-template",
            default=None,
            metavar="FILE",
            help="Jinja chat template for a checkpoint that has none (e.g. PaliGemma base "
            "models), used instead of the checkpoint's; recorded in the artifact and reused at "
            "inference",
        )
        p.add_argument(
            "--min-image-pixels",
            type=int,
            default=None,
            metavar="N",
            help="fewest pixels per image where the processor resizes to a pixel budget "
            "(Qwen2-VL, Qwen2.5-VL); default: the processor's",
        )
        p.add_argument(
            "--max-image-pixels",
            type=int,
            default=None,
            metavar="N",
            help="most pixels per image: Qwen2-VL/Qwen2.5-VL resize to it, LLaVA-OneVision "
            "downscales larger images before tiling; fixed-size processors ignore it (a warning "
            "says so). Recorded in the artifact and reused at inference; default: the processor's",
        )
        p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
        p.add_argument(
            "--register",
            default=None,
            metavar="NAME",
            help="register the artifact in MLflow as NAME",
        )
        p.add_argument("--experiment", default="sav-ray", help="MLflow experiment name")
        p.add_argument(
            "--tracking-uri",
            default=None,
            help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite in data/mlflow/)",
        )
        return p

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> FitConfig:
        return cls.from_namespace(cls.parser().parse_args(argv))

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> FitConfig:
        """The config of parsed flags; flags that are not fields (--verbose) are left out."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names}).validate()


def read_chat_template(path: str | None) -> str | None:
    """The text of the `--chat-template` file (None: the checkpoint's own template)."""
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"--chat-template {path}: cannot be read ({type(e).__name__}); give a Jinja file"
        ) from None
    if not text.strip():
        raise ConfigError(f"--chat-template {path}: the file is empty; give a Jinja chat template")
    return text


def add_manifest_args(p: argparse.ArgumentParser) -> None:
    """Which manifest fields hold what: shared by every job that reads a manifest."""
    p.add_argument(
        "--image-field",
        default="image",
        help="image field(s), comma-separated (default: image); '' for text-only rows",
    )
    p.add_argument("--text-field", default="question", help="the row's text (default: question)")
    p.add_argument("--label-field", default="label", help="the row's label (default: label)")
    p.add_argument("--id-field", default=None, help="a row id carried into the results")
    p.add_argument(
        "--video-field",
        default=None,
        help="field holding one video path per row (.mp4, .webm, .mov, .mkv, .avi, .gif) or "
        "null; default: the field 'video', where the manifest has it",
    )


def manifest_fields(ns: argparse.Namespace) -> ManifestFields:
    """The fields `add_manifest_args` parsed."""
    return ManifestFields.from_flags(
        ns.image_field, ns.text_field, ns.label_field, ns.id_field, ns.video_field
    )


def add_video_frames_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--video-frames",
        type=int,
        default=DEFAULT_VIDEO_FRAMES,
        metavar="N",
        help="frames sampled uniformly from each video (default %(default)s); given to the "
        "processor as its native video input where it has a video processor, else as N images. "
        "Recorded in the artifact and reused at inference",
    )


def add_model_args(p: argparse.ArgumentParser, *, for_artifact: bool = False) -> None:
    """The flags shared by every job that runs the frozen model (fit, predict, evaluate).
    `for_artifact`: the job runs an artifact's base model, and --model only says where to read
    it from (e.g. a local mirror); see `artifact_model`."""
    p.add_argument(
        "--model",
        default="",
        help="where to read the artifact's base model from (default: the hub id or folder it "
        "records; its geometry and revision must still match)"
        if for_artifact
        else "hub id or local folder of an image-text-to-text model or causal LM",
    )
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    add_runtime_args(p)


def artifact_model(ns: argparse.Namespace, base: BaseModelInfo) -> tuple[ModelConfig, str]:
    """The model config of a job that runs an artifact's base model (`add_model_args` flags,
    for_artifact), and the words that name where it came from in an error."""
    model = ModelConfig.from_namespace(ns)
    if model.model:
        return model, "--model"
    located = replace(model, model=base.name_or_path, revision=model.revision or base.revision)
    return located, "the artifact's base model"


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """How the frozen model runs: dtype, batch, and the actor pool's placement."""
    p.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16"
    )
    p.add_argument(
        "--device-map",
        default=None,
        help="accelerate device_map for a model spanning GPUs, e.g. auto",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--actors",
        type=_auto_or(int, 1),
        default=AUTO,
        help="model replicas (Ray actors); auto (default): as many as the cluster's GPUs hold "
        "at --gpus-per-actor, 1 on a CPU cluster",
    )
    p.add_argument(
        "--gpus-per-actor",
        type=_auto_or(float, 0),
        default=AUTO,
        help="auto (default): 1 when the cluster has GPUs, else 0",
    )
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument(
        "--wait-for-resources",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for an autoscaling cluster to grow to the actors' request "
        "(default 0: refuse a request the cluster cannot meet now)",
    )


def _auto_or(kind: type, minimum: float) -> Any:
    """An argparse type: `auto`, or a number of `kind` at least `minimum`."""

    def parse(text: str) -> Any:
        if text == AUTO:
            return AUTO
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give auto or a number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text}: must be at least {minimum} (or auto)")
        return value

    return parse
