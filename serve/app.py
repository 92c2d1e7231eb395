"""Ray Serve application: SAV classifiers over HTTP, many artifacts on one base model.

    serve run serve/config.yaml            # from the repository root; HTTP on :8000
    curl -s localhost:8000/v1/models       # add -H "Authorization: Bearer $SAV_SERVE_TOKEN" if set

Two deployments:
- `Classifier` holds ONE base model and loads SAV artifacts on demand, several per replica
  (`@serve.multiplexed`, keyed by a pinned model id, so requests go to replicas that have the
  artifact). Inputs are batched (`@serve.batch`, batches never mix model ids); each batch is one
  forward pass stopped after the deepest layer its artifact selected. An artifact fitted on
  another base model or revision is refused (409 for the client).
- `Ingress` (FastAPI, routes and docs below) validates requests, decodes images, pins each
  served name to a model id (following `models:/NAME@ALIAS` as the alias moves: polled every
  `poll_interval_s`, at once on POST /v1/models/reload), fans a request's inputs out to the
  classifier and maps every client mistake to a 4xx. A new version is loaded on a classifier
  replica before requests switch to it; requests already running finish on the old one.

Python: `serve.start(http_options={"host": "127.0.0.1", "port": 8000}); serve.run(build_app({...}))`.
"""

import asyncio
import hmac
import itertools
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import ray
import torch
from fastapi import FastAPI, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request

from sav_ray import __version__
from sav_ray.artifact import ArtifactError, SavArtifact
from sav_ray.models import load_model
from sav_ray.prompts import Example
from sav_ray.registry import is_registry_ref, load_artifact_ref, model_version
from sav_ray.serving import (
    BatchStats,
    LayerCounter,
    RequestError,
    RequestLimits,
    Resolved,
    check_prompt,
    classify_isolated,
    resolve_ref,
    split_model_id,
    to_examples,
)
from sav_ray.tracking import use_store
from serve.schemas import (
    AppConfig,
    ClassifyResponse,
    ErrorResponse,
    ModelInfo,
    ModelsResponse,
    ReloadResponse,
    classify_request_model,
)

logger = logging.getLogger("ray.serve")

# Failures of the classifier replica itself (killed, restarting): the call is retried.
RETRYABLE = (
    ray.exceptions.RayActorError,
    serve.exceptions.ReplicaUnavailableError,
    serve.exceptions.DeploymentUnavailableError,
)
RETRIES = 3
OPEN_PATHS = frozenset({"/healthz"})  # answered without the bearer token


def _error(status: int, message: str) -> dict[str, Any]:
    return {"status": status, "error": message}


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _use_registry(cfg: AppConfig) -> None:
    """Point this process's MLflow at the configured store when a model comes from the
    registry: MLflow resolves `models:/` downloads through its global registry URI."""
    if any(is_registry_ref(m.ref) for m in cfg.models):
        use_store(cfg.tracking_uri)


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class Classifier:
    """One base model, many artifacts (multiplexed), batched forward passes."""

    async def __init__(self, config: dict[str, Any]) -> None:
        cfg = AppConfig.model_validate(config)
        self.cfg = cfg
        _use_registry(cfg)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        base, revision = cfg.base_model, cfg.revision
        if not base:  # as jobs/predict.py: the base model the first artifact was fitted on
            first = await asyncio.to_thread(
                load_artifact_ref, cfg.models[0].ref, None, cfg.tracking_uri
            )
            base, revision = first.base_model.name_or_path, revision or first.base_model.revision
        self.lm = await asyncio.to_thread(
            load_model, base, revision, dtype=cfg.dtype, device=cfg.device
        )
        self.layers = LayerCounter(self.lm.model)
        self.batch_stats = BatchStats()
        # Capture hooks are put on the shared model per pass: one forward pass at a time.
        self._model_lock = asyncio.Lock()

        async def load(model_id: str):
            return await asyncio.to_thread(self._load_artifact, model_id)

        self._artifact = serve.multiplexed(max_num_models_per_replica=cfg.max_models_per_replica)(
            load
        )
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def _load_artifact(self, model_id: str) -> SavArtifact:
        ref, digest = split_model_id(model_id)
        artifact = load_artifact_ref(ref, self.lm.info, self.cfg.tracking_uri)
        if digest is not None and artifact.digest != digest:
            raise ArtifactError(
                f"{ref} changed after it was resolved (sav.json SHA-256 {artifact.digest[:12]}, "
                f"expected {digest[:12]}); POST /v1/models/reload"
            )
        return artifact

    async def _get(self, model_id: str):
        """(artifact, None) or (None, error reply): a user-fixable artifact problem (wrong base
        model, corrupt, missing version) is 409; a failing registry is 503."""
        try:
            return await self._artifact(model_id), None
        except (ValueError, LookupError) as e:
            return None, _error(409, f"model {model_id} cannot be served: {e}")
        except Exception as e:
            logger.exception("loading %s failed", model_id)
            return None, _error(503, f"model {model_id} could not be loaded: {_describe(e)}")

    async def load(self, model_id: str) -> dict[str, Any]:
        """Load an artifact (if not yet loaded) and describe it."""
        artifact, error = await self._get(model_id)
        if error:
            return error
        return {
            "artifact_hash": artifact.digest,
            "labels": list(artifact.labels),
            "k": len(artifact.heads),
            "deepest_layer": artifact.deepest_layer,
            "base_model": self.lm.info.to_dict(),
        }

    async def classify(self, model_id: str, example: Example) -> dict[str, Any]:
        """One input -> {label, votes, scores, artifact_hash} or {status, error}."""
        artifact, error = await self._get(model_id)
        if error:
            return error
        try:
            check_prompt(example, artifact)
        except RequestError as e:
            return _error(e.status, e.message)
        return await self._batched(model_id, example)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batched(self, model_ids: list[str], examples: list[Example]) -> list[dict[str, Any]]:
        groups: dict[str, list[int]] = defaultdict(list)  # Serve splits batches by model id too
        for i, model_id in enumerate(model_ids):
            groups[model_id].append(i)
        replies: list[dict[str, Any]] = [{} for _ in examples]
        for model_id, rows in groups.items():
            artifact, error = await self._get(model_id)
            if error:
                for i in rows:
                    replies[i] = error
                continue
            batch = [examples[i] for i in rows]
            async with self._model_lock:
                preds = await asyncio.to_thread(classify_isolated, self.lm, artifact, batch)
            self.batch_stats.record(model_id, preds)
            for i, pred in zip(rows, preds, strict=True):
                replies[i] = (
                    _error(pred.status, pred.message)
                    if isinstance(pred, RequestError)
                    else {**pred.to_dict(), "artifact_hash": artifact.digest}
                )
        return replies

    async def stats(self) -> dict[str, Any]:
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "num_layers": len(self.layers.counts),
            "layers_run": list(self.layers.counts),
            **self.batch_stats.to_dict(),
        }


@dataclass(frozen=True)
class Served:
    """The version a served name answers with, as one value so a switch is one assignment."""

    resolved: Resolved
    summary: dict[str, Any]  # Classifier.load's description
    since: str


@dataclass
class Entry:
    name: str
    ref: str
    served: Served | None = None
    error: str | None = None  # the last refresh's problem; the served version stays
    error_status: int = 409

    def info(self) -> ModelInfo:
        s = self.served
        status = "ready" if s else ("error" if self.error else "loading")
        return ModelInfo(
            name=self.name,
            ref=self.ref,
            status=status,
            version=s and s.resolved.version,
            model_id=s and s.resolved.model_id,
            artifact_hash=s and s.summary["artifact_hash"],
            labels=s and s.summary["labels"],
            k=s and s.summary["k"],
            deepest_layer=s and s.summary["deepest_layer"],
            error=self.error,
            updated_at=s and s.since,
        )


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class Ingress:
    """The HTTP API (`build_api`); owns the served names and which version each answers with."""

    async def __init__(self, classifier: DeploymentHandle, config: dict[str, Any]) -> None:
        self.cfg = AppConfig.model_validate(config)
        _use_registry(self.cfg)
        self.classifier = classifier
        self.token = os.environ.get(self.cfg.token_env) or None
        self.entries = {m.name: Entry(m.name, m.ref) for m in self.cfg.models}
        self.base_model: dict[str, Any] | None = None  # as the classifier loaded it
        self.retries = 0  # classifier calls retried after a replica failure
        self._refresh_lock = asyncio.Lock()
        try:
            await asyncio.wait_for(self.refresh(), self.cfg.load_timeout_s)
        except asyncio.TimeoutError:
            logger.error("models not loaded within load_timeout_s; the poller keeps trying")
        self._poller = asyncio.create_task(self._poll()) if self.cfg.poll_interval_s > 0 else None

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.poll_interval_s)
            try:
                await self.refresh()
            except Exception:
                logger.exception("refreshing the served models failed")

    def _alias_version(self, name: str, alias: str) -> str:
        return str(model_version(f"models:/{name}@{alias}", self.cfg.tracking_uri).version)

    async def refresh(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """Re-resolve served names; load new versions first, then switch to them."""
        async with self._refresh_lock:
            return list(
                await asyncio.gather(
                    *(self._refresh(self.entries[n]) for n in names or self.entries)
                )
            )

    async def _refresh(self, entry: Entry) -> dict[str, Any]:
        before = entry.served
        change = {
            "name": entry.name,
            "from_version": before and before.resolved.version,
            "from_model_id": before and before.resolved.model_id,
            "to_version": before and before.resolved.version,
            "to_model_id": before and before.resolved.model_id,
            "changed": False,
        }
        try:
            resolved = await asyncio.to_thread(resolve_ref, entry.ref, self._alias_version)
        except Exception as e:  # registry unreachable, alias removed, folder gone: keep serving
            entry.error, entry.error_status = f"resolving {entry.ref}: {_describe(e)}", 409
            return {**change, "error": entry.error}
        if before is not None and resolved.model_id == before.resolved.model_id:
            entry.error = None
            return change
        try:
            summary = await self._call("load", resolved.model_id, timeout=self.cfg.load_timeout_s)
        except HTTPException as e:
            summary = _error(e.status_code, e.detail)
        if "error" in summary:
            entry.error, entry.error_status = summary["error"], summary["status"]
            return {**change, "error": entry.error}
        entry.served, entry.error = Served(resolved, summary, _now()), None
        self.base_model = summary["base_model"]
        logger.info("%s now answers with %s", entry.name, resolved.model_id)
        return {
            **change,
            "to_version": resolved.version,
            "to_model_id": resolved.model_id,
            "changed": True,
        }

    async def _call(self, method: str, model_id: str, *args: Any, timeout: float) -> Any:
        """Call the classifier replica that has `model_id` (or will load it); retry when the
        replica dies; 503 when it keeps failing, 504 past `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        handle = self.classifier.options(multiplexed_model_id=model_id)
        for attempt in itertools.count():
            response = getattr(handle, method).remote(model_id, *args)
            try:
                return await asyncio.wait_for(response, max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                response.cancel()
                raise HTTPException(
                    504, f"the classifier did not answer within {timeout:.0f} s; retry later"
                ) from None
            except RETRYABLE as e:
                if attempt + 1 >= RETRIES or loop.time() + 0.5 * 2**attempt > deadline:
                    raise HTTPException(
                        503, f"the classifier is unavailable ({type(e).__name__}); retry later"
                    ) from None
                self.retries += 1
                logger.warning("classifier replica failed (%s); retrying", type(e).__name__)
                await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    async def classify(self, body: Any) -> ClassifyResponse:
        entry = self.entries.get(body.model)
        if entry is None:
            raise HTTPException(
                404,
                f"model: unknown model {body.model!r}; served models are "
                f"{sorted(self.entries)} (GET /v1/models)",
            )
        served = entry.served  # pinned for the whole request: a switch does not affect it
        if served is None:
            if entry.error:
                raise HTTPException(
                    entry.error_status, f"model {body.model!r} cannot be served: {entry.error}"
                )
            raise HTTPException(503, f"model {body.model!r} is still loading; retry shortly")
        examples = await asyncio.to_thread(
            to_examples,
            [(item.text, item.images) for item in body.inputs],
            self.cfg.limits,
            self.cfg.image_sources,
        )
        model_id = served.resolved.model_id
        replies = await asyncio.gather(
            *(
                self._call("classify", model_id, ex, timeout=self.cfg.request_timeout_s)
                for ex in examples
            ),
            return_exceptions=True,
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        for reply in replies:
            if "error" in reply:
                raise HTTPException(reply["status"], reply["error"])
        return ClassifyResponse(
            model=entry.name,
            version=served.resolved.version,
            model_id=model_id,
            artifact_hash=replies[0]["artifact_hash"],
            outputs=[{k: r[k] for k in ("label", "votes", "scores")} for r in replies],
        )

    def models(self) -> ModelsResponse:
        return ModelsResponse(
            base_model=self.base_model,
            poll_interval_s=self.cfg.poll_interval_s,
            models=[e.info() for e in self.entries.values()],
        )


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
pixels, inputs, images per input, text); 422 wrong field or type, or an input the model cannot
take; 503/504 the classifier is unavailable or too slow (retry).

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


def build_api(ingress: Ingress) -> FastAPI:
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
        return {"classifier": classifier, "ingress": {"classifier_retries": ingress.retries}}

    return app


def application(
    cfg: AppConfig,
    classifier_options: dict[str, Any] | None = None,
    ingress_options: dict[str, Any] | None = None,
) -> serve.Application:
    """The bound application; options override each deployment's (replicas, resources, ...)."""
    config = cfg.model_dump(mode="json")
    classifier = Classifier.options(**(classifier_options or {})).bind(config)
    return Ingress.options(**(ingress_options or {})).bind(classifier, config)


def build_app(args: AppConfig) -> serve.Application:
    """The application builder named in serve/config.yaml (`import_path: serve.app:build_app`);
    Serve validates `args` against AppConfig."""
    return application(args if isinstance(args, AppConfig) else AppConfig.model_validate(args))
