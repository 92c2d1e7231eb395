"""MLflow tracking: which store, the experiment, and what fit and evaluation runs log.

One function decides the store, `tracking_uri()`:
  1. the `--tracking-uri` flag, else
  2. the `MLFLOW_TRACKING_URI` environment variable, else
  3. the embedded default: a sqlite database `data/mlflow/mlflow.db` (DEFAULT_STORE_DIR) in
     the checkout (or the current directory when sav-ray is installed, not checked out).
Inside a `ray job submit` job the working directory is a temporary copy, so the default (or
any relative path) would be written there and lost: it is refused, and the message says how to
set the store. A sqlite store keeps artifacts in `artifacts/` beside its database file (MLflow
would put them in ./mlruns of the current directory); a tracking server decides for itself
(`mlflow server --artifacts-destination`).

    with fit_run(cfg) as run:            # an MLflow run that ends FAILED if the block raises
        ...
        log_fit(artifact, artifact_dir, stats, vectors=cfg.save_vectors)

Browse the default store with `mlflow ui --backend-store-uri sqlite:////abs/data/mlflow/mlflow.db`.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sav_ray.core.errors import ConfigError, user_message
from sav_ray.pipelines.placement import format_placements
from sav_ray.tracking.plots import confusion_figure, head_heatmap, k_curve_figure

if TYPE_CHECKING:
    from sav_ray.core.artifact import SavArtifact
    from sav_ray.pipelines.config import FitConfig
    from sav_ray.pipelines.evaluation import Metrics
    from sav_ray.pipelines.fitting import FitStats

DEFAULT_STORE_DIR = Path("data") / "mlflow"  # relative to the checkout: the README names it
DB_FILE = "mlflow.db"
SAV_SUBDIR = "sav"  # run artifact path of the SAV artifact; also its name inside a logged model
# Ray sets this in the entrypoint process of a submitted job (the job's config as JSON).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_JOB_HINT = (
    "set MLFLOW_TRACKING_URI in the job's environment, e.g. ray job submit --runtime-env-json "
    '\'{"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow-host:5000"}}\' ..., or pass '
    "--tracking-uri sqlite:////abs/path/mlflow.db (an absolute path on the head node)"
)


def in_ray_job() -> bool:
    """True in the entrypoint of `ray job submit`, whose working directory is a temporary copy."""
    return RAY_JOB_ENV in os.environ


def project_root() -> Path:
    """The checkout holding this package, or the current directory for an installed package."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def default_tracking_uri() -> str:
    return f"sqlite:///{project_root() / DEFAULT_STORE_DIR / DB_FILE}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def _is_relative_local(uri: str) -> bool:
    db = sqlite_path(uri)
    if db is not None:
        return not db.is_absolute()
    return "://" not in uri and not uri.startswith("file:") and not os.path.isabs(uri)


def tracking_uri(flag: str | None = None) -> str:
    """The MLflow store to use: `flag`, else MLFLOW_TRACKING_URI, else the embedded default."""
    source = "--tracking-uri" if flag else "MLFLOW_TRACKING_URI"
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if in_ray_job() and _is_relative_local(uri):
            raise ConfigError(
                f"{source} {uri!r} is a relative path: under `ray job submit` it would be "
                f"written to the job's temporary working directory and lost; {_JOB_HINT}"
            )
        return uri
    if in_ray_job():
        raise ConfigError(
            f"no MLflow store given: under `ray job submit` the default store "
            f"({DEFAULT_STORE_DIR}/{DB_FILE}) would be written to the job's temporary working "
            f"directory and lost; {_JOB_HINT}"
        )
    return default_tracking_uri()


def use_store(flag: str | None = None) -> str:
    """Decide the store (see `tracking_uri`), create a sqlite store's folder, point MLflow at it."""
    import mlflow

    uri = tracking_uri(flag)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def check_job_outputs(cfg: FitConfig) -> None:
    """Refuse relative output paths under `ray job submit`: they would land in a temporary copy."""
    check_job_path("--output", cfg.output)
    check_job_path("--save-vectors", cfg.save_vectors)


def check_job_path(flag: str, path: str | None) -> None:
    if path and in_ray_job() and "://" not in path and not os.path.isabs(path):
        raise ConfigError(
            f"{flag} {path}: a relative path under `ray job submit` would be written to the "
            "job's temporary working directory and lost; give an absolute path on shared "
            "storage, or use --register NAME to keep the artifact in MLflow"
        )


def experiment_id(name: str, uri: str) -> str:
    """The id of experiment `name`, created on first use (a sqlite store's artifacts beside it)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is None:
        db = sqlite_path(uri)
        location = str(db.resolve().parent / "artifacts") if db is not None else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another job on the same store
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise ConfigError(
            f"--experiment {name}: the experiment is deleted in {uri}; restore it "
            f"(mlflow experiments restore --experiment-id {found.experiment_id}) or choose "
            "another name"
        )
    return found.experiment_id


@contextmanager
def run(
    experiment: str, uri: str, run_name: str, tags: dict[str, str] | None = None
) -> Iterator[Any]:
    """An active MLflow run; FINISHED when the block ends, FAILED (with `sav.error`) if it
    raises, KILLED if the job is stopped (SIGTERM, Ctrl-C)."""
    import mlflow
    from mlflow.entities import RunStatus

    with mlflow.start_run(
        experiment_id=experiment_id(experiment, uri), run_name=run_name, tags=tags
    ) as active:
        try:
            yield active
        except BaseException as e:
            stopped = isinstance(e, KeyboardInterrupt)  # JobStopped (SIGTERM) or Ctrl-C
            message = f"stopped by {e or 'SIGINT'}" if stopped else user_message(e)
            try:
                mlflow.set_tag("sav.error", (message or f"{type(e).__name__}: {e}")[:4000])
                if stopped:  # else the block's exit ends it FAILED
                    mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            except Exception:  # the original error matters more than its tag
                pass
            raise


@dataclass(frozen=True)
class FitRun:
    run_id: str
    uri: str
    scratch: Path  # temporary folder, removed when the run ends


@contextmanager
def fit_run(cfg: FitConfig) -> Iterator[FitRun]:
    """The MLflow run of one fit, with the whole config as params."""
    import mlflow

    uri = use_store(cfg.tracking_uri)
    name = cfg.register or Path(cfg.output).name or "sav"
    with (
        run(cfg.experiment, uri, f"fit-{name}", tags={"sav.job": "fit"}) as active,
        tempfile.TemporaryDirectory(prefix="sav-fit-") as scratch,
    ):
        mlflow.log_params(cfg.to_params())
        yield FitRun(active.info.run_id, uri, Path(scratch))


def log_fit(
    artifact: SavArtifact, artifact_dir: str | Path, stats: FitStats, vectors: str | None = None
) -> None:
    """Into the active run: metrics, the SAV artifact, the head heat map, the vectors' location."""
    import time

    import mlflow
    from mlflow.entities import Metric

    scores = artifact.selection.scores  # selected heads, best first
    metrics = {
        "train_accuracy": stats.train_accuracy,
        "examples": stats.examples,
        "forward_rows": stats.forward_rows,
        "wall_seconds": stats.wall_seconds,
        "extract_seconds": stats.extract_seconds,
        "selected_head_score_mean": float(np.mean(scores)),
        "selected_head_score_min": float(np.min(scores)),
    }
    if math.isfinite(stats.examples_per_second):
        metrics["examples_per_second"] = stats.examples_per_second
    if math.isfinite(stats.forward_share):
        metrics["actor_forward_share"] = stats.forward_share
    if artifact.calibration is not None:
        metrics["temperature"] = artifact.calibration.temperature
        metrics["loo_accuracy"] = artifact.calibration.loo_accuracy
        metrics["loo_log_loss"] = artifact.calibration.loo_log_loss
    if artifact.threshold is not None:
        metrics["threshold"] = artifact.threshold.threshold
        metrics["threshold_loo_precision"] = artifact.threshold.precision
        metrics["threshold_loo_recall"] = artifact.threshold.recall
    mlflow.log_metrics(metrics)
    now = int(time.time() * 1000)
    run_id = mlflow.active_run().info.run_id
    mlflow.MlflowClient().log_batch(
        run_id,
        metrics=[Metric("selected_head_score", s, now, rank) for rank, s in enumerate(scores)],
    )
    curve = stats.k_curve
    if curve is not None and len(curve.ks) > 1:  # --num-heads auto: the curve it chose from
        loss, _ = curve.best_log_loss()
        mlflow.MlflowClient().log_batch(
            run_id,
            metrics=[
                m
                for k, acc, ll in zip(curve.ks, curve.accuracy(), loss, strict=True)
                for m in (
                    Metric("loo_accuracy_at_k", float(acc), now, int(k)),
                    Metric("loo_log_loss_at_k", float(ll), now, int(k)),
                )
            ],
        )
        mlflow.log_figure(k_curve_figure(curve, len(artifact.heads)), "k_curve.png")
    mlflow.log_artifacts(str(artifact_dir), SAV_SUBDIR)
    if artifact.head_scores is not None:
        mlflow.log_figure(head_heatmap(artifact.head_scores, artifact.heads), "head_scores.png")
    tags = {
        "sav.artifact_digest": artifact.digest,
        "sav.base_model": artifact.base_model.name_or_path,
        "sav.revision": artifact.base_model.revision or "",
        "sav.top_heads": " ".join(f"L{layer}H{head}" for layer, head in artifact.heads[:10]),
    }
    if stats.placements:
        tags["sav.placement"] = format_placements(stats.placements)
    if vectors:
        tags["sav.vectors"] = str(Path(vectors).resolve()) if "://" not in vectors else vectors
    mlflow.set_tags(tags)


def metric_key(*parts: str) -> str:
    """An MLflow metric name from parts (a label may hold characters MLflow refuses)."""
    return "/".join(re.sub(r"[^\w.\- ]", "_", p) for p in parts)


def log_evaluation(
    report: dict[str, Metrics],
    model_id: str | None = None,
    binary: dict[str, float] | None = None,
    reliability: Any = None,
) -> None:
    """Into the active run: each method's metrics (`sav/accuracy`, ...), linked to the logged
    model when `model_id` is given, the positive label's figures (`binary`: `sav/roc_auc`, ...),
    each method's confusion matrix and the SAV's reliability diagram as PNGs."""
    import mlflow

    metrics: dict[str, float] = {}
    for key, value in (binary or {}).items():
        if isinstance(value, float):
            metrics[metric_key("sav", key)] = value
    for method, m in report.items():
        metrics[metric_key(method, "accuracy")] = m.accuracy
        metrics[metric_key(method, "macro_f1")] = m.macro_f1
        if m.ece is not None:
            metrics[metric_key(method, "ece")] = m.ece
        if m.ece_probabilities is not None:
            metrics[metric_key(method, "ece_probabilities")] = m.ece_probabilities
        for label, recall in m.recall.items():
            metrics[metric_key(method, "recall", label)] = recall
    mlflow.log_metrics(metrics, model_id=model_id)
    mlflow.log_dict({method: m.to_dict() for method, m in report.items()}, "evaluation.json")
    for method, m in report.items():
        mlflow.log_figure(confusion_figure(m, method), f"confusion_{method}.png")
    if reliability is not None:
        mlflow.log_figure(reliability, "reliability.png")
