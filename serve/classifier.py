"""The Classifier deployment: ONE base model, many SAV artifacts sharing its forward passes.

Artifacts load on demand through the project's single loader (an LRU per replica,
`@serve.multiplexed`, keyed by a pinned model id), refusing one fitted on another base model or
revision. Each call classifies one input, already encoded by the Ingress's processor threads
(`encode_example`: one row per distinct prompt), for one or more model ids, so this replica
only pads, moves to its device and runs the model. Calls are batched
(`@serve.batch`) whatever model ids they name: a batch is per base model, not per artifact, and
is ONE forward pass (`classify_shared`) capturing the union of the batch's heads, stopped after
the deepest layer any of its artifacts selected; each artifact then votes with its own heads.
"""

import asyncio
import logging
import time
from typing import Any

import ray
import torch
from ray import serve

from sav_ray.core.artifact import ArtifactError, SavArtifact
from sav_ray.core.capture import LayerCounter
from sav_ray.core.classify import input_key
from sav_ray.core.models import load_model
from sav_ray.pipelines.logs import quiet_progress_bars
from sav_ray.pipelines.placement import actor_placement
from sav_ray.serving.admission import peak_rss_mb
from sav_ray.serving.requests import (
    BatchStats,
    RequestError,
    Rows,
    classify_shared,
    split_model_id,
)
from sav_ray.tracking.registry import is_registry_ref, load_artifact_ref
from sav_ray.tracking.runs import use_store
from serve.schemas import (
    AppConfig,
)

logger = logging.getLogger("ray.serve")

# Failures of the classifier replica itself (killed, restarting): the call is retried.
RETRYABLE = (
    ray.exceptions.RayActorError,
    serve.exceptions.ReplicaUnavailableError,
    serve.exceptions.DeploymentUnavailableError,
)
RETRIES = 3


def error_summary(status: int, message: str) -> dict[str, Any]:
    return {"status": status, "error": message}


def describe_error(e: BaseException) -> str:
    return str(e) or type(e).__name__


def use_registry(cfg: AppConfig) -> None:
    """Point this process's MLflow at the configured store when a model comes from the
    registry: MLflow resolves `models:/` downloads through its global registry URI."""
    if any(is_registry_ref(m.ref) for m in cfg.models):
        use_store(cfg.tracking_uri)


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class Classifier:
    """One base model, many artifacts (multiplexed), batched forward passes."""

    async def __init__(self, config: dict[str, Any]) -> None:
        quiet_progress_bars()  # unless SAV_LOG_LEVEL asks: no download or loading bars
        # First, before CUDA starts: a replica given no GPU must not take the node's first one
        # (Ray leaves every GPU visible to it).
        self.placement = actor_placement()
        cfg = AppConfig.model_validate(config)
        self.cfg = cfg
        use_registry(cfg)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        base, revision = cfg.base_model, cfg.revision
        if not base:  # as jobs/predict.py: the base model the first artifact was fitted on
            first = await asyncio.to_thread(
                load_artifact_ref, cfg.models[0].ref, None, cfg.tracking_uri
            )
            base, revision = first.base_model.name_or_path, revision or first.base_model.revision
        device = cfg.device or self.placement["device"]
        self.lm = await asyncio.to_thread(
            load_model, base, revision, dtype=cfg.dtype, device=device
        )
        self.processor_source = [base, revision]  # where the Ingress loads the same processor
        self.placement["device"] = str(self.lm.input_device)
        self.layers = LayerCounter(self.lm.model)
        self.batch_stats = BatchStats()
        self.in_flight = 0  # classify calls in this replica now (waiting or running)
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
            return None, error_summary(409, f"model {model_id} cannot be served: {e}")
        except Exception as e:
            logger.exception("loading %s failed", model_id)
            return None, error_summary(
                503, f"model {model_id} could not be loaded: {describe_error(e)}"
            )

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
            "temperature": artifact.calibration and artifact.calibration.temperature,
            "threshold": artifact.threshold and artifact.threshold.to_dict(),
            # the Ingress decodes and encodes inputs with the artifact's settings
            "video_frames": artifact.preprocessing.video_frames,
            "prompt": artifact.prompt.to_dict(),
            "preprocessing": artifact.preprocessing.to_dict(),
            "base_model": self.lm.info.to_dict(),
            "processor": self.processor_source,
        }

    async def classify(self, model_ids: list[str], rows: Rows, where: str) -> dict[str, Any]:
        """One input, encoded by the Ingress (`encode_example`: input_key -> row), for one or
        more model ids -> {"results": {model_id: {label, votes, scores, artifact_hash}}} or
        {status, error}. `where` names the input in errors."""
        started = time.perf_counter()
        self.in_flight += 1
        try:
            return await self._classify(model_ids, rows, where)
        finally:
            self.in_flight -= 1
            seconds = self.batch_stats.seconds
            seconds["calls"] = seconds.get("calls", 0.0) + time.perf_counter() - started

    async def _classify(self, model_ids: list[str], rows: Rows, where: str) -> dict[str, Any]:
        artifacts = []
        for model_id in model_ids:
            artifact, error = await self._get(model_id)
            if error:
                return error
            if input_key(artifact) not in rows:  # the Ingress encodes with the artifact's prompt
                return error_summary(
                    409, f"model {model_id}: the input was not encoded with its prompt; retry"
                )
            artifacts.append(artifact)
        return await self._batched((tuple(model_ids), artifacts, where), rows)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batched(
        self, named: list[tuple[tuple[str, ...], list[SavArtifact], str]], rows: list[Rows]
    ) -> list[dict[str, Any]]:
        """A batch of inputs, whatever artifacts each names: one forward pass."""
        items = [(r, artifacts) for (_, artifacts, _), r in zip(named, rows, strict=True)]
        where = [w for _, _, w in named]
        async with self._model_lock:
            results, n_rows = await asyncio.to_thread(
                classify_shared, self.lm, items, self.batch_stats.seconds, where
            )
        self.batch_stats.record([ids for ids, _, _ in named], results, n_rows)
        replies = []
        for (ids, artifacts, _), result in zip(named, results, strict=True):
            if isinstance(result, RequestError):
                replies.append(error_summary(result.status, result.message))
                continue
            replies.append(
                {
                    "results": {
                        model_id: {**pred.to_dict(), "artifact_hash": artifact.digest}
                        for model_id, artifact, pred in zip(ids, artifacts, result, strict=True)
                    }
                }
            )
        return replies

    async def stats(self) -> dict[str, Any]:
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "placement": self.placement,
            "num_layers": len(self.layers.counts),
            "layers_run": list(self.layers.counts),
            "forward_passes": self.layers.counts[0] if self.layers.counts else 0,
            "rows_run": self.layers.rows,
            "in_flight": self.in_flight,
            "peak_rss_mb": peak_rss_mb(),
            **self.batch_stats.to_dict(),
        }
