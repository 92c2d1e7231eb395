"""Evaluate a SAV (and baselines) on Ray Data; log it to MLflow; tag the model version.

    python jobs/evaluate.py --model models:/pets@candidate --data /abs/test.jsonl

`--model` is a registered version (models:/NAME@ALIAS, models:/NAME/VERSION) or an artifact
folder. On the same rows it measures the SAV and the baselines of `--baselines` (default all):
every head voting (class centroids of all heads from `--train`, one model pass, from
`--train-vectors`, a folder of fit.py --save-vectors, or else from the vectors the fit's run
recorded; skipped with a note when there are none) and the base model's zero-shot answer
(sav_ray/pipelines/evaluation.py). The run logs accuracy, macro-F1, per-class recall, the ECE of the vote
shares and of the probabilities, confusion matrices and a reliability diagram, linked to the
logged model; with `--positive-label` also ROC-AUC, PR-AUC and the threshold reaching
`--target-precision` or `--target-recall` on these rows. A registered version gets `eval.*`
tags (accuracy, data hash, run id, ...), which jobs/promote.py gates on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sav_ray.cli import job_parser, parse_job_args
from sav_ray.core.errors import (
    ConfigError,
    job_main,
)
from sav_ray.core.manifest import (
    check_image_files,
    read_manifest,
    refuse_images,
)
from sav_ray.pipelines.config import (
    add_manifest_args,
    add_model_args,
    artifact_model,
    manifest_fields,
)
from sav_ray.pipelines.evaluation import (
    all_heads_centroids,
    binary_report,
    check_labels,
    evaluate_table,
    format_table,
    summarize,
)
from sav_ray.pipelines.fitting import init_ray
from sav_ray.pipelines.preflight import check_model
from sav_ray.tracking import registry
from sav_ray.tracking.plots import reliability_figure
from sav_ray.tracking.runs import log_evaluation, run, use_store


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = job_parser("evaluate", __doc__)
    p.add_argument(
        "--artifact",
        required=True,
        metavar="REF",
        help="the SAV to evaluate: models:/NAME@ALIAS, models:/NAME/N or an artifact folder",
    )
    p.add_argument("--data", required=True, help="labelled manifest to evaluate on")
    p.add_argument(
        "--baselines",
        default="all",
        choices=("all", "zero-shot", "all-heads", "none"),
        help="baselines beside the SAV (default all)",
    )
    train = p.add_mutually_exclusive_group()
    train.add_argument("--train", help="training manifest, for the all-heads centroids")
    train.add_argument("--train-vectors", metavar="DIR", help="or its saved vectors (no model)")
    p.add_argument(
        "--positive-label",
        default=None,
        metavar="LABEL",
        help="report ROC-AUC and PR-AUC of p(LABEL) (default: the SAV's threshold's label)",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-precision", type=float, default=None, metavar="P")
    target.add_argument("--target-recall", type=float, default=None, metavar="R")
    p.add_argument("--max-new-tokens", type=int, default=8, help="zero-shot answer length")
    add_manifest_args(p)
    add_model_args(p, for_artifact=True)
    p.add_argument("--experiment", default="sav-ray", help="MLflow experiment name")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (see jobs/fit.py)")
    args = parse_job_args(p, argv)
    return args


@job_main
def main(argv: list[str] | None) -> int:
    args = parse(argv)
    uri = use_store(args.tracking_uri)
    artifact = registry.load_artifact_ref(args.artifact, uri=uri)
    version = (
        registry.model_version(args.artifact, uri)
        if registry.is_registry_ref(args.artifact)
        else None
    )
    model, flag = artifact_model(args, artifact.base_model)
    fields = manifest_fields(args)
    test = read_manifest(args.data, fields)
    check_labels(test, artifact.labels, "--data")
    check_image_files(test)
    all_heads = args.baselines in ("all", "all-heads")
    zero_shot = args.baselines in ("all", "zero-shot")
    vectors_dir = args.train_vectors
    if all_heads and not (args.train or vectors_dir):
        vectors_dir, note = recorded_vectors(version, uri)
        if vectors_dir is None:
            all_heads = False
            print(f"note: the all-heads baseline is skipped: {note}")
    train = read_manifest(args.train, fields) if args.train and all_heads else None
    if train is not None:
        check_image_files(train)
    info = check_model(model, artifact.prompt, test, flag)
    artifact.base_model.check_compatible(info)
    if train is not None and not info.takes_images:
        refuse_images(train, info.text_only_reason)
    positive = args.positive_label or (artifact.threshold and artifact.threshold.positive_label)
    if (args.target_precision or args.target_recall) and not positive:
        raise ConfigError("--target-precision/--target-recall need --positive-label LABEL")
    if positive and positive not in artifact.labels:
        raise ConfigError(
            f"--positive-label {positive!r}: not a label of the SAV {artifact.labels}"
        )
    if positive and artifact.calibration is None:
        raise ConfigError(
            f"--positive-label {positive!r}: the SAV has no probabilities (fitted before "
            "sav-ray had them); re-fit it"
        )
    name = f"{version.name}-v{version.version}" if version else Path(args.artifact).name
    tags = {"sav.job": "evaluate", "sav.model": args.artifact}
    with run(args.experiment, uri, f"evaluate-{name}", tags=tags) as active:
        import mlflow

        mlflow.log_params({k: v for k, v in vars(args).items() if v is not None})
        init_ray()
        centroids = (
            all_heads_centroids(artifact, model, train_table=train, vectors_dir=vectors_dir)
            if all_heads
            else None
        )
        records = evaluate_table(
            test, model, artifact, centroids, args.max_new_tokens, zero_shot=zero_shot
        )
        report = summarize(records, artifact.labels)
        binary = None
        if positive:
            target = "precision" if args.target_precision is not None else "recall"
            value = args.target_precision if target == "precision" else args.target_recall
            binary = binary_report(
                records,
                artifact.labels,
                positive,
                target if value is not None else None,
                value,
                artifact.threshold,
            )
        log_evaluation(
            report,
            model_id=registry.logged_model_id(version) if version else None,
            binary=binary,
            reliability=reliability_figure(records, artifact.labels),
        )
        rows = "".join(json.dumps(r, default=str) + "\n" for r in records)
        mlflow.log_text(rows, "predictions.jsonl")
        if version is not None:
            eval_tags = registry.evaluation_tags(report, args.data, active.info.run_id, binary)
            registry.set_version_tags(version.name, version.version, eval_tags, uri)
    print(f"{len(records)} rows of {args.data}")
    print(
        format_table(
            report,
            k=len(artifact.heads),
            num_heads=artifact.base_model.num_layers * artifact.base_model.num_heads,
        )
    )
    if binary:
        print(format_binary(binary, positive))
    print(f"MLflow run {active.info.run_id} in {uri}")
    if version is not None:
        print(f"tagged models:/{version.name}/{version.version} with eval.*")
    return 0


def recorded_vectors(version, uri: str) -> tuple[str | None, str]:
    """The vectors folder the fit's run recorded (`--save-vectors`: tag sav.vectors), or None
    and why not."""
    if version is None:
        return None, "an artifact folder has no fit run; give --train or --train-vectors"
    import mlflow

    try:
        tags = mlflow.MlflowClient(uri).get_run(version.run_id).data.tags
    except Exception as e:  # the run was deleted, or the store is another one
        return None, f"the fit's run {version.run_id} cannot be read ({e}); give --train"
    folder = tags.get("sav.vectors")
    if not folder:
        return None, (
            "its fit saved no vectors (fit.py --save-vectors); give --train or --train-vectors"
        )
    if "://" not in folder and not Path(folder).is_dir():
        return None, f"the fit's vectors {folder} are gone; give --train or --train-vectors"
    return folder, ""


def format_binary(binary: dict, positive: str) -> str:
    lines = [
        f"{positive!r} against the rest: ROC-AUC {binary['roc_auc']:.3f}, "
        f"PR-AUC {binary['pr_auc']:.3f}"
    ]
    if "threshold" in binary:
        lines.append(
            f"  threshold {binary['threshold']:.4g} reaches precision "
            f"{binary['threshold_precision']:.3f}, recall {binary['threshold_recall']:.3f} here"
        )
    if "threshold_note" in binary:
        lines.append(f"  {binary['threshold_note']}")
    if "stored_threshold" in binary:
        lines.append(
            f"  the SAV's threshold {binary['stored_threshold']:.4g}: precision "
            f"{binary['stored_precision']:.3f}, recall {binary['stored_recall']:.3f} here"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
