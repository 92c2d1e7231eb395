"""Evaluate a SAV against two baselines on Ray Data; log it to MLflow; tag the model version.

    python jobs/evaluate.py --model models:/pets@candidate --data /abs/test.jsonl \
        --train /abs/train.jsonl

`--model` is a registered version (models:/NAME@ALIAS, models:/NAME/VERSION) or an artifact
folder. On the same rows it measures the SAV, every head voting (class centroids of all heads
from `--train`, one model pass, or from `--train-vectors`, a folder of fit.py --save-vectors)
and the base model's zero-shot answer (sav_ray/evaluation.py). The run logs accuracy, macro-F1,
per-class recall, ECE and confusion matrices, linked to the logged model; a registered version
also gets `eval.*` tags (accuracy, data hash, run id), which jobs/promote.py gates on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from sav_ray import registry  # noqa: E402
from sav_ray.config import ModelConfig, add_runtime_args, add_video_field_arg  # noqa: E402
from sav_ray.errors import job_main  # noqa: E402
from sav_ray.evaluation import (  # noqa: E402
    all_heads_centroids,
    check_labels,
    evaluate_table,
    format_table,
    summarize,
)
from sav_ray.fitting import init_ray  # noqa: E402
from sav_ray.manifest import (  # noqa: E402
    ManifestFields,
    check_image_files,
    read_manifest,
    refuse_images,
)
from sav_ray.preflight import check_model  # noqa: E402
from sav_ray.tracking import log_evaluation, run, use_store  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/evaluate.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/N or a folder")
    p.add_argument("--data", required=True, help="labelled manifest to evaluate on")
    train = p.add_mutually_exclusive_group(required=True)
    train.add_argument("--train", help="training manifest, for the all-heads centroids")
    train.add_argument("--train-vectors", metavar="DIR", help="or its saved vectors (no model)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="zero-shot answer length")
    p.add_argument("--image-field", default="image", help="'' for text-only rows")
    p.add_argument("--text-field", default="question")
    p.add_argument("--label-field", default="label")
    p.add_argument("--id-field", default=None)
    add_video_field_arg(p)
    p.add_argument("--base-model", default="", help="another location of the artifact's model")
    add_runtime_args(p)
    p.add_argument("--experiment", default="sav-ray", help="MLflow experiment name")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (see jobs/fit.py)")
    return p.parse_args(argv)


@job_main
def main(argv: list[str] | None) -> int:
    args = parse(argv)
    uri = use_store(args.tracking_uri)
    artifact = registry.load_artifact_ref(args.model, uri=uri)
    version = (
        registry.model_version(args.model, uri) if registry.is_registry_ref(args.model) else None
    )
    base = artifact.base_model
    model = ModelConfig.from_namespace(
        args, model=args.base_model or base.name_or_path, revision=base.revision
    )
    flag = "--base-model" if args.base_model else "the SAV's base model"
    fields = ManifestFields.from_flags(
        args.image_field, args.text_field, args.label_field, args.id_field, args.video_field
    )
    test = read_manifest(args.data, fields)
    check_labels(test, artifact.labels, "--data")
    check_image_files(test)
    train = read_manifest(args.train, fields) if args.train else None
    if train is not None:
        check_image_files(train)
    info = check_model(model, artifact.prompt, test, flag)
    artifact.base_model.check_compatible(info)
    if train is not None and not info.takes_images:
        refuse_images(train, info.text_only_reason)
    name = f"{version.name}-v{version.version}" if version else Path(args.model).name
    tags = {"sav.job": "evaluate", "sav.model": args.model}
    with run(args.experiment, uri, f"evaluate-{name}", tags=tags) as active:
        import mlflow

        mlflow.log_params({k: v for k, v in vars(args).items() if v is not None})
        init_ray()
        centroids = all_heads_centroids(
            artifact, model, train_table=train, vectors_dir=args.train_vectors
        )
        records = evaluate_table(test, model, artifact, centroids, args.max_new_tokens)
        report = summarize(records, artifact.labels)
        log_evaluation(report, model_id=registry.logged_model_id(version) if version else None)
        rows = "".join(json.dumps(r, default=str) + "\n" for r in records)
        mlflow.log_text(rows, "predictions.jsonl")
        if version is not None:
            eval_tags = registry.evaluation_tags(report, args.data, active.info.run_id)
            registry.set_version_tags(version.name, version.version, eval_tags, uri)
    print(f"{len(records)} rows of {args.data}")
    print(format_table(report, k=len(artifact.heads), num_heads=base.num_layers * base.num_heads))
    print(f"MLflow run {active.info.run_id} in {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
