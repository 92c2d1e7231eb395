"""Ray Serve application: SAV classifiers over HTTP, many artifacts on one base model.

    serve run serve/config.yaml            # from the repository root; HTTP on :8000
    curl -s localhost:8000/v1/models       # add -H "Authorization: Bearer $SAV_SERVE_TOKEN" if set

Two deployments:
- `Classifier` (serve/classifier.py) holds ONE base model and loads SAV artifacts on demand,
  several per replica, batches inputs whatever artifacts they name (`@serve.batch`: a batch is
  per base model) into one forward pass that captures the union of their heads and stops after
  the deepest layer any of them selected; it refuses an artifact fitted on another base model
  or revision (409 for the client).
- `Ingress` (here; its FastAPI routes, docs and guards are in serve/http_api.py) validates
  requests, decodes images (base64, uploads, allowed files and URLs) and videos, pins each
  served name to a model id (following `models:/NAME@ALIAS` as the alias moves: polled every
  `poll_interval_s`, at once on POST /v1/models/reload), sends each input once to the
  classifier with every model id the request named, and maps every client mistake to a 4xx. A new version
  is loaded on a classifier replica before requests switch to it; requests already running
  finish on the old one.

Python: `serve.start(http_options={"host": "127.0.0.1", "port": 8000}); serve.run(build_app({...}))`.
"""

import asyncio
import copy
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

from fastapi import FastAPI, HTTPException
from ray import serve
from ray.serve.handle import DeploymentHandle

from sav_ray.core.artifact import BaseModelInfo
from sav_ray.core.prompts import PromptConfig
from sav_ray.core.resolution import Preprocessing
from sav_ray.pipelines.logs import serve_logging_config
from sav_ray.pipelines.placement import AUTO, cluster_nodes, resolve
from sav_ray.pipelines.preprocess import model_processor
from sav_ray.serving.admission import BoundedPool, Busy, PixelBudget, peak_rss_mb
from sav_ray.serving.requests import (
    UPLOAD_PREFIX,
    Resolved,
    Rows,
    encode_example,
    is_fetched,
    refuse_control_characters,
    resolve_ref,
    to_examples,
)
from sav_ray.tracking.registry import model_version
from serve.classifier import (
    RETRIES,
    RETRYABLE,
    Classifier,
    describe_error,
    error_summary,
    use_registry,
)
from serve.http_api import build_api
from serve.schemas import (
    AppConfig,
    ClassifyResponse,
    ModelInfo,
    ModelsResponse,
    MultiClassifyResponse,
)

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Served:
    """The version a served name answers with, as one value so a switch is one assignment."""

    resolved: Resolved
    summary: dict[str, Any]  # Classifier.load's description
    since: str

    @cached_property
    def variant(self) -> tuple[PromptConfig, Preprocessing]:
        """The prompt and preprocessing its inputs are encoded with, parsed once."""
        return (
            PromptConfig.from_dict(self.summary["prompt"]),
            Preprocessing.from_dict(self.summary["preprocessing"]),
        )


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
            temperature=s and s.summary["temperature"],
            threshold=s and s.summary["threshold"],
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
        use_registry(self.cfg)
        self.classifier = classifier
        self.token = os.environ.get(self.cfg.token_env) or None
        self.entries = {m.name: Entry(m.name, m.ref) for m in self.cfg.models}
        self.base_model: dict[str, Any] | None = None  # as the classifier loaded it
        self.retries = 0  # classifier calls retried after a replica failure
        # seconds spent decoding inputs, in the processor, awaiting the classifier's answers
        # (all of a request's inputs at once) and in the whole request handler
        self.seconds = {"decode": 0.0, "encode": 0.0, "classifier_calls": 0.0, "requests": 0.0}
        self.processor_source: list | None = None  # [model, revision], as the classifier has it
        self._local = threading.local()  # a processor per pool thread
        self._seconds_lock = threading.Lock()
        self._refresh_lock = asyncio.Lock()
        # a slow image source can hold only fetch workers, never a base64 request's decoding
        self.fetch_pool = BoundedPool("fetch", self.cfg.fetch_workers, self.cfg.fetch_queue)
        self.decode_pool = BoundedPool("decode", self.cfg.decode_workers, self.cfg.decode_queue)
        self.pixels = PixelBudget(self.cfg.pixel_budget, self.cfg.pixel_wait_s)
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
            entry.error, entry.error_status = f"resolving {entry.ref}: {describe_error(e)}", 409
            return {**change, "error": entry.error}
        if before is not None and resolved.model_id == before.resolved.model_id:
            entry.error = None
            return change
        try:
            summary = await self._call(
                "load",
                resolved.model_id,
                model_id=resolved.model_id,
                timeout=self.cfg.load_timeout_s,
            )
        except HTTPException as e:
            summary = error_summary(e.status_code, e.detail)
        if "error" in summary:
            entry.error, entry.error_status = summary["error"], summary["status"]
            return {**change, "error": entry.error}
        if self.processor_source is None:  # processor files only, loaded once per Ingress
            await asyncio.to_thread(model_processor, *summary["processor"])
            self.processor_source = summary["processor"]
        entry.served, entry.error = Served(resolved, summary, _now()), None
        self.base_model = summary["base_model"]
        logger.info("%s now answers with %s", entry.name, resolved.model_id)
        return {
            **change,
            "to_version": resolved.version,
            "to_model_id": resolved.model_id,
            "changed": True,
        }

    async def _call(
        self, method: str, *args: Any, timeout: float, model_id: str | None = None
    ) -> Any:
        """Call a classifier replica (the one that has `model_id` loaded, if given); retry when
        the replica dies; 503 when it keeps failing, 504 past `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        handle = self.classifier
        if model_id is not None:
            handle = handle.options(multiplexed_model_id=model_id)
        for attempt in itertools.count():
            response = getattr(handle, method).remote(*args)
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

    def _served(self, name: str, field: str) -> Served:
        """The version `name` answers with now (pinned for the whole request: a switch does not
        affect it); 404 unknown name, 409 or 503 when it cannot answer."""
        refuse_control_characters(name, field)
        entry = self.entries.get(name)
        if entry is None:
            raise HTTPException(
                404,
                f"{field}: unknown model {name!r}; served models are "
                f"{sorted(self.entries)} (GET /v1/models)",
            )
        if entry.served is None:
            if entry.error:
                raise HTTPException(
                    entry.error_status, f"{field}: model {name!r} cannot be served: {entry.error}"
                )
            raise HTTPException(503, f"{field}: model {name!r} is still loading; retry shortly")
        return entry.served

    async def classify(self, body: Any, uploads: dict[str, bytes] | None = None) -> Any:
        """`body.model` (one result) or `body.models` (one result per model, one forward pass
        per input for all of them). `uploads`: a multipart request's files, which images name
        as `part:NAME`."""
        started = time.perf_counter()
        try:
            return await self._classify(body, uploads or {})
        finally:
            with self._seconds_lock:
                self.seconds["requests"] += time.perf_counter() - started

    async def _classify(self, body: Any, uploads: dict[str, bytes]) -> Any:
        names, fields = body.named()
        served = [self._served(n, f) for n, f in zip(names, fields, strict=True)]
        base = BaseModelInfo.from_dict(self.base_model)
        for i, item in enumerate(body.inputs):
            for field, given in (("images", item.images), ("video", item.video)):
                if given and not base.takes_images:
                    raise HTTPException(
                        422, f"inputs[{i}].{field}: {base.text_only_reason}; send the text alone"
                    )
        frames = {s.summary["video_frames"] for s in served}
        if len(frames) > 1 and any(item.video for item in body.inputs):
            raise HTTPException(
                422,
                f"models: {names} sample videos into different numbers of frames "
                f"({sorted(frames)}); send a video to them in separate requests",
            )
        images = [_with_uploads(item.images, uploads, i) for i, item in enumerate(body.inputs)]
        fetches = any(is_fetched(source) for sources in images for source in sources)
        pool = self.fetch_pool if fetches else self.decode_pool
        variants = [s.variant for s in served]
        try:
            with self.pixels.lease() as lease:
                rows = await pool.run(
                    self._encode,
                    [
                        (item.text, sources)
                        for item, sources in zip(body.inputs, images, strict=True)
                    ],
                    [item.video for item in body.inputs],
                    frames.pop(),
                    lease.reserve,
                    variants,
                )
                images = []  # the encoded images are not needed any more
                for item in body.inputs:
                    item.images, item.video = [], None
                model_ids = [s.resolved.model_id for s in served]
                replies = await self._classify_rows(model_ids, rows)
        except Busy as e:
            raise HTTPException(
                503, e.message, headers={"Retry-After": str(e.retry_after_s)}
            ) from None
        results = [
            ClassifyResponse(
                model=name,
                version=s.resolved.version,
                model_id=s.resolved.model_id,
                artifact_hash=replies[0][s.resolved.model_id]["artifact_hash"],
                outputs=[
                    {k: v for k, v in r[s.resolved.model_id].items() if k != "artifact_hash"}
                    for r in replies
                ],
            )
            for name, s in zip(names, served, strict=True)
        ]
        return results[0] if body.model is not None else MultiClassifyResponse(results=results)

    def _encode(
        self,
        inputs: list[tuple[str, list[str | bytes]]],
        videos: list[str | None],
        video_frames: int,
        reserve: Any,
        variants: list[tuple[PromptConfig, Preprocessing]],
    ) -> list[Rows]:
        """In a pool thread: decode the inputs (`to_examples`), then run the processor on each,
        once per distinct prompt of the named models (`encode_example`), so the classifier
        replica only pads and runs the model."""
        started = time.perf_counter()
        examples = to_examples(
            inputs, self.cfg.limits, self.cfg.image_sources, videos, video_frames, reserve
        )
        decoded = time.perf_counter()
        processor = self._thread_processor()
        rows = [encode_example(processor, ex, variants) for ex in examples]
        with self._seconds_lock:
            self.seconds["decode"] += decoded - started
            self.seconds["encode"] += time.perf_counter() - decoded
        return rows

    def _thread_processor(self) -> Any:
        """This pool thread's own copy of the processor: a fast tokenizer must not be used by
        two threads at once (it sets its padding state on each call)."""
        processor = getattr(self._local, "processor", None)
        if processor is None:
            processor = copy.deepcopy(model_processor(*self.processor_source))
            self._local.processor = processor
        return processor

    async def _classify_rows(self, model_ids: list[str], rows: list[Rows]) -> list[dict[str, Any]]:
        """Per input, {model_id: result}."""
        started = time.perf_counter()
        replies = await asyncio.gather(
            *(
                self._call(
                    "classify", model_ids, r, f"inputs[{i}]", timeout=self.cfg.request_timeout_s
                )
                for i, r in enumerate(rows)
            ),
            return_exceptions=True,
        )
        with self._seconds_lock:
            self.seconds["classifier_calls"] += time.perf_counter() - started
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        for reply in replies:
            if "error" in reply:
                raise HTTPException(reply["status"], reply["error"])
        return [reply["results"] for reply in replies]

    def stats(self) -> dict[str, Any]:
        """The Ingress's counters for GET /v1/stats."""
        return {
            "classifier_retries": self.retries,
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
            "fetch_pool": self.fetch_pool.stats(),
            "decode_pool": self.decode_pool.stats(),
            "pixels": self.pixels.stats(),
            "peak_rss_mb": peak_rss_mb(),
        }

    def models(self) -> ModelsResponse:
        return ModelsResponse(
            base_model=self.base_model,
            poll_interval_s=self.cfg.poll_interval_s,
            models=[e.info() for e in self.entries.values()],
        )


def _with_uploads(sources: list[str], uploads: dict[str, bytes], i: int) -> list[str | bytes]:
    """An input's image sources with each `part:NAME` replaced by that uploaded file's bytes;
    400 naming the field when no such part was sent."""
    out: list[str | bytes] = []
    for j, source in enumerate(sources):
        if source.startswith(UPLOAD_PREFIX):
            part = source.removeprefix(UPLOAD_PREFIX)
            if part not in uploads:
                raise HTTPException(
                    400,
                    f"inputs[{i}].images[{j}]: names the upload {part!r}, but the request has "
                    f"no file part of that name (parts: {sorted(uploads)})",
                )
            out.append(uploads[part])
        else:
            out.append(source)
    return out


def application(
    cfg: AppConfig,
    classifier_options: dict[str, Any] | None = None,
    ingress_options: dict[str, Any] | None = None,
) -> serve.Application:
    """The bound application; options override each deployment's (replicas, resources, ...).
    The Classifier's resources default to `classifier_resources(cfg)`."""
    config = cfg.model_dump(mode="json")
    options = dict(classifier_options or {})
    if "ray_actor_options" not in options:
        options["ray_actor_options"] = classifier_resources(cfg)
    options.setdefault("logging_config", serve_logging_config())
    ingress = {"logging_config": serve_logging_config(), **(ingress_options or {})}
    classifier = Classifier.options(**options).bind(config)
    return Ingress.options(**ingress).bind(classifier, config)


def classifier_resources(cfg: AppConfig) -> dict[str, Any]:
    """The Classifier replica's `ray_actor_options`: `gpus_per_replica` (auto: 1 when a node of
    the cluster has a GPU, else 0) and `cpus_per_replica`."""
    gpus = cfg.gpus_per_replica
    if gpus == AUTO:
        import ray

        if not ray.is_initialized():
            ray.init()  # joins the cluster (or starts one) as serve.run would
        gpus = resolve(1, AUTO, 0, cluster_nodes(), reserved_cpus=0)[1]
    return {"num_cpus": cfg.cpus_per_replica, "num_gpus": gpus}


def build_app(args: AppConfig) -> serve.Application:
    """The application builder named in serve/config.yaml (`import_path: serve.app:build_app`);
    Serve validates `args` against AppConfig. The Classifier's GPUs are set from the cluster
    here, so serve/config.yaml must not give it `ray_actor_options` (they would replace them)."""
    return application(args if isinstance(args, AppConfig) else AppConfig.model_validate(args))
