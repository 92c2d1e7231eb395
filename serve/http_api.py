"""The HTTP layer of the Ingress: FastAPI routes (shown at /docs), the bearer-token and
body-size guard, and the mapping of every client mistake to a 4xx with a message."""

import asyncio
import hmac
import json
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from sav_ray import __version__
from sav_ray.serving.requests import (
    UPLOAD_PREFIX,
    RequestError,
    RequestLimits,
    refuse_control_characters,
)
from serve.classifier import RETRYABLE
from serve.schemas import (
    ClassifyResponse,
    ErrorResponse,
    ModelsResponse,
    MultiClassifyResponse,
    ReloadResponse,
    classify_request_model,
)

if TYPE_CHECKING:
    from serve.app import Ingress

OPEN_PATHS = frozenset({"/healthz"})  # answered without the bearer token


class Guard:
    """ASGI middleware: the bearer token (every path but OPEN_PATHS) and the body size limit,
    both checked before the body is read."""

    def __init__(self, app: Any, token: str | None, max_body_bytes: int) -> None:
        self.app, self.token, self.max_body_bytes = app, token, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.token.encode()
            ):
                return await _send_json(
                    send,
                    401,
                    "missing or wrong bearer token: send the header "
                    "'Authorization: Bearer <token>'",
                    {"WWW-Authenticate": "Bearer"},
                )
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_json(send, 400, "Content-Length is not a number")
            if int(length) > self.max_body_bytes:
                return await _send_json(send, 413, self._too_large(int(length)))
        seen = 0

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise HTTPException(413, self._too_large(seen))
            return message

        return await self.app(scope, counted_receive, send)

    def _too_large(self, size: int) -> str:
        return (
            f"the request body is {size} bytes or more, over the limit of "
            f"{self.max_body_bytes} bytes; send fewer or smaller images per request"
        )


async def _send_json(
    send: Any, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    response = JSONResponse({"detail": detail}, status, headers=headers)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _field(loc: tuple) -> str:
    parts = [p for p in loc if p != "body"]
    out = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    return out or "body"


def _validation_handler(limits: RequestLimits):
    async def handler(request: Request, exc: RequestValidationError) -> JSONResponse:
        """Malformed JSON: 400; a limit exceeded (too many inputs or images, text or image too
        long): 413; any other schema violation: 422. The message names each field."""
        errors = exc.errors()
        kinds = {e["type"] for e in errors}
        if "json_invalid" in kinds:
            error = next(e for e in errors if e["type"] == "json_invalid")
            where = f" at character {error['loc'][-1]}" if isinstance(error["loc"][-1], int) else ""
            reason = error.get("ctx", {}).get("error", "")
            return JSONResponse({"detail": f"the body is not valid JSON{where}: {reason}"}, 400)
        status = 413 if kinds & {"too_long", "string_too_long"} else 422

        def describe(e: dict[str, Any]) -> str:
            text = f"{_field(e['loc'])}: {e['msg']}"
            if e["type"] == "string_too_long" and "images" in e["loc"]:
                text += f" (the base64 of at most {limits.max_image_bytes} bytes)"
            if e["type"] == "string_too_long" and "video" in e["loc"]:
                text += f" (the base64 of at most {limits.max_video_bytes} bytes)"
            return text

        shown = "; ".join(describe(e) for e in errors[:5])
        more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
        return JSONResponse({"detail": shown + more}, status)

    return handler


def _validate(model: type[BaseModel], data: Any) -> Any:
    """`model.model_validate(data)`, its errors reported as FastAPI's own for a JSON body."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        raise RequestValidationError(errors) from None


def _json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at character {e.pos}" if isinstance(e, json.JSONDecodeError) else ""
        reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise HTTPException(400, f"{what} is not valid JSON{where}: {reason}") from None


async def _read_upload(
    request: Request, limits: RequestLimits
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A multipart/form-data request -> (the JSON body it stands for, file part name -> bytes).

    Either a `request` part holding the JSON body, whose images may name file parts as
    `part:NAME`; or, for one input, the fields `model` (or `models`, repeated) and `text` and
    one file part per image, in order (any part names)."""
    form = await request.form(
        max_files=limits.max_inputs * limits.max_images_per_input,
        max_fields=4 + limits.max_models_per_request,
        max_part_size=limits.max_body_bytes,
    )
    uploads: dict[str, bytes] = {}
    fields: dict[str, list[str]] = {}
    repeated: list[str] = []  # file part names sent more than once
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                key = name if name not in uploads else f"{name}#{len(uploads)}"
                if key != name:
                    repeated.append(name)
                uploads[key] = await value.read()
            else:
                fields.setdefault(name, []).append(value)
    finally:
        await form.close()
    if "request" in fields and repeated:  # `part:NAME` must name one file, whatever the order
        raise HTTPException(
            400, f"file part {repeated[0]!r} is sent twice; give each file part its own name"
        )
    if "request" in fields:
        if len(fields) > 1 or len(fields["request"]) > 1:
            raise HTTPException(
                400, "a multipart request with a `request` part has no other fields, only files"
            )
        return _json(fields["request"][0].encode(), "the `request` part"), uploads
    unknown = sorted(set(fields) - {"model", "models", "text"})
    if unknown:
        raise HTTPException(
            400,
            f"multipart fields {unknown} are not known: send `model` (or `models`), `text` and "
            "the images as file parts, or the JSON body as a `request` part",
        )
    body: dict[str, Any] = {
        "inputs": [
            {
                "text": "".join(fields.get("text", [""])[-1:]),
                "images": [UPLOAD_PREFIX + key for key in uploads],
            }
        ]
    }
    if "model" in fields:
        body["model"] = fields["model"][-1]
    if "models" in fields:
        body["models"] = fields["models"]
    return body, uploads


def _openapi(app: FastAPI, request_model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI document, with /v1/classify's two request bodies: JSON (the request model)
    and multipart/form-data (a `request` part, or `model`/`models`, `text` and image files)."""
    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schema = request_model.model_json_schema(ref_template="#/components/schemas/{model}")
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    components.update(schema.pop("$defs", {}))
    components["ClassifyRequest"] = schema
    file = {"type": "string", "format": "binary"}
    spec["paths"]["/v1/classify"]["post"]["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ClassifyRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "request": {
                            "type": "string",
                            "description": "the JSON body; an image `part:NAME` is the file "
                            "part NAME",
                        },
                        "model": {"type": "string"},
                        "models": {"type": "array", "items": {"type": "string"}},
                        "text": {"type": "string"},
                        "image": {"type": "array", "items": file},
                    },
                }
            },
        },
    }
    app.openapi_schema = spec
    return spec


async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"detail": exc.message}, exc.status)


API_DESCRIPTION = """
Few-shot classifiers built from the attention heads of a frozen vision-language model
(Sparse Attention Vectors). Every served model shares one base model.

Errors are JSON `{"detail": "..."}` naming the field: 400 malformed JSON, base64 or image;
401 missing or wrong bearer token (when the server has one); 404 unknown model; 409 the model's
artifact cannot be served (e.g. fitted on another base model); 413 too large (body, image bytes,
pixels, inputs, images per input, text, video bytes, frames or seconds); 422 wrong field or type, or an input the model cannot
take; 503 the server is busy (a full pool or the pixel budget: see Retry-After) or the classifier
is unavailable, 504 too slow (retry).

When the server has a token, send `Authorization: Bearer <token>` on every route but /healthz.
"""

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "malformed JSON, base64 or image"),
        (401, "missing or wrong bearer token"),
        (404, "unknown model"),
        (409, "the model's artifact cannot be served"),
        (413, "too large"),
        (422, "wrong field or type, or an input the model cannot take"),
        (503, "classifier unavailable; retry"),
        (504, "classifier too slow; retry"),
    )
}


def build_api(ingress: "Ingress") -> FastAPI:
    """The FastAPI app of one Ingress replica (its limits and token come from the config)."""
    cfg = ingress.cfg
    ClassifyRequest = classify_request_model(cfg.limits)  # noqa: N806
    app = FastAPI(title="sav-ray", version=__version__, description=API_DESCRIPTION)
    app.add_middleware(Guard, token=ingress.token, max_body_bytes=cfg.limits.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_handler(cfg.limits))
    app.add_exception_handler(RequestError, _request_error)

    @app.get("/healthz", responses={503: {"model": ErrorResponse}})
    async def healthz() -> dict[str, Any]:
        """Liveness and readiness, without a token: 200 when at least one model is ready.

        curl -s localhost:8000/healthz
        """
        ready = sum(e.served is not None for e in ingress.entries.values())
        if not ready:
            raise HTTPException(503, "no model is ready yet")
        return {"status": "ok", "models_ready": ready, "models": len(ingress.entries)}

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse | MultiClassifyResponse,
        responses=ERROR_RESPONSES,
    )
    async def classify(request: Request) -> ClassifyResponse | MultiClassifyResponse:
        """Classify inputs (text and images) with one served model, or several at once.

        Returns, per input in order, the predicted `label`, the heads' `votes` per label,
        `scores` (votes / k), `probabilities` (summing to 1; null for a model fitted before
        sav-ray had them) and `decision` (where the model has a threshold on one label's
        probability: whether it is reached), with the model's name, registry `version` and `artifact_hash`
        (SHA-256 of its sav.json). Images are the image file's bytes in base64 (a
        `data:image/png;base64,...` URI works too); `<image>` in the text marks where images go,
        otherwise they come before the text.

            IMG=$(base64 -w0 cat.png)
            curl -s localhost:8000/v1/classify -H 'Content-Type: application/json' \\
              -d '{"model": "shapes", "inputs": [{"text": "What is in the image?", "images": ["'$IMG'"]}]}'

            {"model": "shapes", "version": "3", "model_id": "models:/shapes/3",
             "artifact_hash": "9f2c...", "outputs": [{"label": "red_circle",
             "votes": {"red_circle": 17, "green_square": 2, "blue_triangle": 1},
             "scores": {"red_circle": 0.85, "green_square": 0.1, "blue_triangle": 0.05},
             "probabilities": {"red_circle": 0.93, "green_square": 0.04, "blue_triangle": 0.03},
             "decision": null}]}

        `"models": ["shapes", "safety"]` instead of `"model"`: ONE forward pass per input serves
        all of them (they share the base model); the answer is `{"results": [...]}`, one result
        per name in order, each what that model alone answers.

        Raw image files instead of base64, as multipart/form-data: `model` (or `models`,
        repeated), `text` and one file part per image, in order; or a `request` part with the
        JSON body whose images name file parts as `part:NAME`:

            curl -s localhost:8000/v1/classify -F model=shapes -F text='What is it?' -F image=@cat.png
        """
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            data, uploads = await _read_upload(request, cfg.limits)
        else:
            data, uploads = _json(await request.body(), "the body"), {}
        return await ingress.classify(_validate(ClassifyRequest, data), uploads)

    @app.get("/v1/models", response_model=ModelsResponse, responses=ERROR_RESPONSES)
    async def models() -> ModelsResponse:
        """The served models: name, reference, status, the version answering now, its artifact
        hash, labels, k and deepest layer; and the shared base model.

            curl -s localhost:8000/v1/models
        """
        return ingress.models()

    @app.post("/v1/models/reload", response_model=ReloadResponse, responses=ERROR_RESPONSES)
    async def reload(
        model: str | None = Query(None, description="one served name; default: all"),
    ) -> ReloadResponse:
        """Re-resolve aliases (and artifact folders) now instead of at the next poll. A new
        version is loaded before requests switch to it; requests already running finish on the
        old one. A version that cannot be loaded is not switched to (see `error`).

            curl -s -X POST localhost:8000/v1/models/reload
            curl -s -X POST 'localhost:8000/v1/models/reload?model=shapes'
        """
        if model is not None:
            refuse_control_characters(model, "model")
        if model is not None and model not in ingress.entries:
            raise HTTPException(404, f"model: unknown model {model!r}")
        changes = await ingress.refresh(None if model is None else [model])
        return ReloadResponse(changes=changes)

    app.openapi = lambda: _openapi(app, ClassifyRequest)

    @app.get("/v1/stats", responses=ERROR_RESPONSES)
    async def stats() -> dict[str, Any]:
        """Counters. `classifier` (of the one replica that answered): `batches`, `batch_sizes`
        (inputs in a batch -> batches), `max_batch_size`, `inputs_per_model` (pinned model id ->
        inputs), `models_per_batch` (distinct model ids in a batch -> batches: a batch serves
        every artifact of the base model), `forward_passes` (calls of the model),
        `in_flight` (calls inside the replica now), `forward_rows` and `rows_run` (rows those
        passes ran: one per input and distinct prompt, however many models the input named),
        `seconds` (in calls, the forward pass and voting) and `layers_run`, how many times each decoder layer ran: the layers after the deepest
        selected one stay at 0. `ingress`: `classifier_retries`, calls retried because a
        classifier replica failed, and `seconds` spent decoding inputs, in the processor,
        awaiting the classifier and in request handlers.

            curl -s localhost:8000/v1/stats
        """
        try:
            classifier = await asyncio.wait_for(
                ingress.classifier.stats.remote(), cfg.request_timeout_s
            )
        except (asyncio.TimeoutError, *RETRYABLE) as e:
            raise HTTPException(
                503, f"the classifier is unavailable ({type(e).__name__})"
            ) from None
        return {"classifier": classifier, "ingress": ingress.stats()}

    return app
