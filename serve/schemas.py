"""The server's configuration and its HTTP request and response models (pydantic).

`AppConfig` is the `args:` block of `serve/config.yaml`, validated once when the application
is built (a wrong or unknown key is reported by name). The request model is built from the
configured limits (`classify_request_model`), so `/openapi.json` states them (`maxItems`,
`maxLength`) and a request over one gets 413.
"""

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from sav_ray.serving.requests import ImageSources, RequestLimits

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class ServedModel(BaseModel):
    """One classifier the server offers: the name clients use, and where its artifact is."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME, description="the name clients send as `model`")
    ref: str = Field(
        min_length=1,
        description="models:/NAME@ALIAS (followed as the alias moves), models:/NAME/VERSION, "
        "or an artifact folder on the server",
    )


class AppConfig(BaseModel):
    """`args:` of serve/config.yaml (see there for each key's meaning)."""

    model_config = ConfigDict(extra="forbid")

    models: list[ServedModel] = Field(min_length=1)
    base_model: str | None = Field(
        None, description="hub id or folder; default: the first model's artifact's base model"
    )
    revision: str | None = None
    dtype: str = "auto"
    device: str | None = Field(
        None, description="default: the replica's GPU when it has one (gpus_per_replica), else cpu"
    )
    gpus_per_replica: float | Literal["auto"] = Field(
        "auto", description="GPUs of each Classifier replica; auto: 1 if the cluster has GPUs"
    )
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs of each Classifier replica")
    torch_threads: int | None = Field(None, ge=1)
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: MLFLOW_TRACKING_URI or the local store"
    )
    poll_interval_s: float = Field(30.0, ge=0, description="alias polling period; 0 turns it off")
    request_timeout_s: float = Field(60.0, gt=0)
    load_timeout_s: float = Field(600.0, gt=0)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_models_per_replica: int = Field(8, ge=1)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    image_sources: ImageSources = Field(default_factory=ImageSources)
    token_env: str = Field(
        "SAV_SERVE_TOKEN",
        description="environment variable holding the bearer token; unset or empty: no token",
    )
    fetch_workers: int = Field(
        4,
        ge=1,
        description="threads of the Ingress that fetch and decode requests with URLs or "
        "file:// images",
    )
    fetch_queue: int = Field(8, ge=0, description="such requests waiting beyond those; then 503")
    decode_workers: int = Field(
        2, ge=1, description="threads of the Ingress that decode base64 requests"
    )
    decode_queue: int = Field(64, ge=0, description="such requests waiting beyond those; then 503")
    pixel_budget: int = Field(
        48_000_000,
        ge=1,
        description="decoded pixels an Ingress replica holds at once (images and video frames "
        "of requests in flight); at least limits.max_request_pixels",
    )
    pixel_wait_s: float = Field(
        5.0, ge=0, description="how long a request waits for pixel budget before a 503"
    )

    @field_validator("gpus_per_replica")
    @classmethod
    def _gpus_not_negative(cls, gpus: float | str) -> float | str:
        if gpus != "auto" and gpus < 0:
            raise ValueError("gpus_per_replica must be auto or at least 0")
        return gpus

    @model_validator(mode="after")
    def _models_fit_a_replica(self) -> "AppConfig":
        if self.limits.max_models_per_request > self.max_models_per_replica:
            raise ValueError(
                f"limits.max_models_per_request ({self.limits.max_models_per_request}) must be "
                f"at most max_models_per_replica ({self.max_models_per_replica}): every model of "
                "a request is loaded on the replica that runs it"
            )
        return self

    @model_validator(mode="after")
    def _budget_fits_a_request(self) -> "AppConfig":
        if self.pixel_budget < self.limits.max_request_pixels:
            raise ValueError(
                f"pixel_budget ({self.pixel_budget}) must be at least limits.max_request_pixels "
                f"({self.limits.max_request_pixels}): a request within the limits must fit"
            )
        return self

    @field_validator("models")
    @classmethod
    def _distinct_names(cls, models: list[ServedModel]) -> list[ServedModel]:
        names = [m.name for m in models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"model names must be distinct; repeated: {repeated}")
        return models


class InputBase(BaseModel):
    model_config = ConfigDict(extra="forbid")


def classify_request_model(limits: RequestLimits) -> type[BaseModel]:
    """The `POST /v1/classify` body, with `limits` as schema constraints."""
    image = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_image_chars)]

    class ClassifyInput(InputBase):
        text: str = Field(
            "",
            max_length=limits.max_text_chars,
            description="the input's text (the question); `<image>` marks where images go",
        )
        images: list[image] = Field(
            default_factory=list,
            max_length=limits.max_images_per_input,
            description="images in order, each the file's bytes in base64 (or a data: URI); "
            "file:// paths and URLs only where the server allows them; none for a text-only "
            "base model (a text LLM: 422)",
        )
        video: str | None = Field(
            None,
            min_length=1,
            max_length=limits.max_video_chars,
            description="one video (mp4, webm, mov, mkv, avi or gif), the file's bytes in base64 "
            "(or a data: URI); the model's number of frames is sampled uniformly and goes before "
            "the images",
        )

    class ClassifyRequest(InputBase):
        model: str | None = Field(
            None,
            max_length=128,
            description="a served model name (GET /v1/models); the answer is that model's result",
        )
        models: list[Annotated[str, StringConstraints(max_length=128)]] | None = Field(
            None,
            min_length=1,
            max_length=limits.max_models_per_request,
            description="several served model names instead of `model`: one forward pass per "
            "input serves them all; the answer has one result per model, in this order",
        )
        inputs: list[ClassifyInput] = Field(min_length=1, max_length=limits.max_inputs)

        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={
                "examples": [
                    {
                        "model": "shapes",
                        "inputs": [{"text": "What is in the image?", "images": ["iVBORw0KGgo..."]}],
                    },
                    {
                        "models": ["shapes", "safety"],
                        "inputs": [{"text": "What is in the image?", "images": ["iVBORw0KGgo..."]}],
                    },
                ]
            },
        )

        @model_validator(mode="after")
        def _one_way_to_name(self) -> "ClassifyRequest":
            if (self.model is None) == (self.models is None):
                raise ValueError("give either `model` (one name) or `models` (a list), not both")
            if self.models is not None:
                repeated = sorted({m for m in self.models if self.models.count(m) > 1})
                if repeated:
                    raise ValueError(f"models: each name once; repeated: {repeated}")
            return self

        def named(self) -> tuple[list[str], list[str]]:
            """(model names, the field naming each: `model` or `models[i]`)."""
            if self.models is None:
                return [self.model], ["model"]
            return list(self.models), [f"models[{i}]" for i in range(len(self.models))]

    return ClassifyRequest


class Output(BaseModel):
    label: str = Field(
        description="the predicted label: most votes (or the most probable label where the "
        "model was fitted with --decision probability)"
    )
    votes: dict[str, int] = Field(description="heads voting for each label; they sum to k")
    scores: dict[str, float] = Field(description="votes / k per label")
    probabilities: dict[str, float] | None = Field(
        None,
        description="per label, summing to 1: softmax of the selected heads' mean cosine "
        "similarity over the model's fitted temperature; null for a model fitted before "
        "probabilities existed",
    )
    decision: bool | None = Field(
        None,
        description="where the model has a threshold: probabilities[positive_label] >= "
        "threshold (GET /v1/models); else null",
    )


class ClassifyResponse(BaseModel):
    model: str
    version: str | None = Field(description="registry version; null for an artifact folder")
    model_id: str = Field(description="the pinned reference that answered")
    artifact_hash: str = Field(description="SHA-256 of the artifact's sav.json")
    outputs: list[Output] = Field(description="one per input, in order")


class MultiClassifyResponse(BaseModel):
    results: list[ClassifyResponse] = Field(
        description="one per name in `models`, in order; each what that model alone answers"
    )


class ModelInfo(BaseModel):
    name: str
    ref: str
    status: str = Field(description="ready | loading | error")
    version: str | None = None
    model_id: str | None = None
    artifact_hash: str | None = None
    labels: list[str] | None = None
    k: int | None = Field(None, description="selected heads")
    deepest_layer: int | None = Field(None, description="the forward pass stops after it")
    temperature: float | None = Field(None, description="of the probabilities; null: none")
    threshold: dict | None = Field(
        None, description="positive_label, threshold and the target it was chosen for"
    )
    error: str | None = Field(None, description="the last refresh's error, if any")
    updated_at: str | None = None


class ModelsResponse(BaseModel):
    base_model: dict | None
    poll_interval_s: float
    models: list[ModelInfo]


class ReloadChange(BaseModel):
    name: str
    from_version: str | None
    to_version: str | None
    from_model_id: str | None
    to_model_id: str | None
    changed: bool
    error: str | None = None


class ReloadResponse(BaseModel):
    changes: list[ReloadChange]


class ErrorResponse(BaseModel):
    detail: str
