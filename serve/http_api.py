"""The HTTP layer of the Ingress: FastAPI routes (shown at /docs), the bearer-token and
body-size guard, and the mapping of every client mistake to a 4xx with a message."""

import asyncio
import hmac
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import Request

from sav_ray import __version__
from sav_ray.serving import (
    RequestError,
    RequestLimits,
    refuse_control_characters,
)
from serve.classifier import RETRYABLE
from serve.schemas import (
    ClassifyResponse,
    ErrorResponse,
    ModelsResponse,
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

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES)
    async def classify(body: ClassifyRequest) -> ClassifyResponse:
        """Classify inputs (text and images) with a served model.

        Returns, per input in order, the predicted `label`, the heads' `votes` per label and
        `scores` (votes / k), with the model's name, registry `version` and `artifact_hash`
        (SHA-256 of its sav.json). Images are the image file's bytes in base64 (a
        `data:image/png;base64,...` URI works too); `<image>` in the text marks where images go,
        otherwise they come before the text.

            IMG=$(base64 -w0 cat.png)
            curl -s localhost:8000/v1/classify -H 'Content-Type: application/json' \\
              -d '{"model": "shapes", "inputs": [{"text": "What is in the image?", "images": ["'$IMG'"]}]}'

            {"model": "shapes", "version": "3", "model_id": "models:/shapes/3",
             "artifact_hash": "9f2c...", "outputs": [{"label": "red_circle",
             "votes": {"red_circle": 17, "green_square": 2, "blue_triangle": 1},
             "scores": {"red_circle": 0.85, "green_square": 0.1, "blue_triangle": 0.05}}]}
        """
        return await ingress.classify(body)

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

    @app.get("/v1/stats", responses=ERROR_RESPONSES)
    async def stats() -> dict[str, Any]:
        """Counters. `classifier` (of the one replica that answered): `batches`, `batch_sizes`
        (size -> batches), `max_batch_size`, `inputs_per_model` (pinned model id -> inputs) and
        `layers_run`, how many times each decoder layer ran: the layers after the deepest
        selected one stay at 0. `ingress`: `classifier_retries`, calls retried because a
        classifier replica failed.

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
