"""Fit a Sparse Attention Vector classifier on Ray and write its artifact.

Locally (starts a Ray of its own):
    python jobs/fit.py --model data/demo/model --train data/demo/train.jsonl --output /abs/sav

On a cluster (joins it; outputs must be absolute paths, URIs or --register):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/fit.py --model Qwen/Qwen2-VL-2B-Instruct --train /data/train.jsonl \
        --output /shared/savs/pets-v1    # one actor per GPU (--actors/--gpus-per-actor auto)

Refit with another k or selection from saved vectors, without the model:
    python jobs/fit.py --from-vectors /abs/vectors --num-heads 10 --output /abs/sav-k10

k from the data, and a threshold for a binary task (both leave-one-out on the training set):
    python jobs/fit.py ... --num-heads auto --positive-label unsafe --target-precision 0.95

Every fit is an MLflow run (params, metrics, the artifact, a head heat map) in the store of
--tracking-uri, MLFLOW_TRACKING_URI or data/mlflow/ (sav_ray/tracking/runs.py); a failed fit's run
ends FAILED. `--register NAME` also makes the artifact a model version with alias `candidate`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from sav_ray.cli import parse_job_args, prog
from sav_ray.core.artifact import write_artifact
from sav_ray.core.errors import ConfigError, job_main
from sav_ray.core.manifest import check_image_files, read_manifest, validate_for_fit
from sav_ray.pipelines.config import FitConfig
from sav_ray.pipelines.fitting import check_positive_label, fit, init_ray
from sav_ray.pipelines.placement import format_placements, place
from sav_ray.pipelines.preflight import check_model
from sav_ray.tracking.registry import check_model_name, register_artifact
from sav_ray.tracking.runs import check_job_outputs, fit_run, log_fit


@job_main
def main(argv: list[str] | None) -> int:
    args = parse_job_args(FitConfig.parser(prog("fit")), argv)
    cfg = FitConfig.from_namespace(args)
    check_job_outputs(cfg)
    check_model_name(cfg.register)
    if cfg.output and Path(cfg.output).exists() and not cfg.overwrite:
        raise ConfigError(f"--output {cfg.output}: already exists; pass --overwrite to replace it")
    table = None  # --from-vectors: no manifest
    if not cfg.from_vectors:
        # Before Ray starts: the manifest (as fit() checks it, read once: fit() takes it), then
        # the model from its config and processor files only.
        table = read_manifest(cfg.train, cfg.manifest_fields)
        check_positive_label(cfg, validate_for_fit(table, cfg.selection))
        check_image_files(table)
        info = check_model(cfg, cfg.prompt, table)
        print(f"model {info.describe()}")
        init_ray()
        placed = place(cfg)  # a request the cluster cannot meet fails now, not in the run
        print(f"{placed.actors} model actors, {placed.gpus_per_actor:g} GPUs each")
    # The run ends FAILED if anything below raises, KILLED if the job is stopped (SIGTERM,
    # Ctrl-C): then no version is left, and a stopped fit leaves no artifact either.
    with fit_run(cfg) as run:
        artifact, stats = fit(cfg, table)
        out = cfg.output or run.scratch / "sav"
        artifact = write_artifact(artifact, out, overwrite=cfg.overwrite)  # whole or nothing
        try:
            log_fit(artifact, out, stats, vectors=cfg.save_vectors)
            version = register_artifact(cfg.register, artifact, out) if cfg.register else None
        except KeyboardInterrupt:
            shutil.rmtree(out, ignore_errors=True)
            raise
    heads = ", ".join(f"L{layer}H{head}" for layer, head in artifact.heads[:5])
    print(
        f"fitted {stats.examples} examples ({stats.forward_rows:.0f} model rows) "
        f"in {stats.wall_seconds:.1f}s; train accuracy {stats.train_accuracy:.3f}; "
        f"top heads {heads}; artifact {cfg.output or '(MLflow only)'}"
    )
    cal = artifact.calibration
    print(
        f"k = {len(artifact.heads)}; leave-one-out accuracy {cal.loo_accuracy:.3f}, "
        f"probabilities' temperature {cal.temperature:.4g} (log loss {cal.loo_log_loss:.3f})"
    )
    if artifact.threshold is not None:
        t = artifact.threshold
        print(
            f"threshold p({t.positive_label}) >= {t.threshold:.4g}: leave-one-out precision "
            f"{t.precision:.3f}, recall {t.recall:.3f} (target {t.target} {t.target_value:g})"
        )
    if stats.placements:
        print(format_placements(stats.placements))
    print(f"MLflow run {run.run_id} in {run.uri}")
    if version is not None:
        print(f"registered models:/{version.name}/{version.version} (alias candidate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
