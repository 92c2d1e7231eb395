"""Classify a manifest with one or more SAV artifacts on Ray Data; write one result per row.

    python jobs/predict.py --artifact /abs/sav --data data/demo/test.jsonl --output preds.jsonl
    python jobs/predict.py --artifact models:/safety@production --artifact topic=/abs/topic/sav \
        --data data/demo/test.jsonl --output preds.parquet

Each result has `row`, `id`, `label` (predicted), `votes`, `scores` and `probabilities` per
label (no probabilities for an artifact fitted before they existed), `decision` where the
artifact has a threshold, and `true_label` when the manifest has one; the accuracy is printed when it does. With several
`--artifact`s (all fitted on one base model) the model runs ONCE per row for all of them, and
each result has every artifact's `label`, `votes` and `scores` under its name: `NAME=REF`, or
by default the registered model's name (models:/NAME@ALIAS) or the folder's name. The base
model is the artifacts' own (`--model` overrides its location, e.g. a local mirror; its
geometry and revision must still match).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sav_ray.cli import job_parser, parse_job_args
from sav_ray.core.artifact import ArtifactError
from sav_ray.core.classify import input_variants
from sav_ray.core.errors import ConfigError, job_main
from sav_ray.core.manifest import check_image_files, read_manifest
from sav_ray.pipelines.config import (
    add_manifest_args,
    add_model_args,
    artifact_model,
    manifest_fields,
)
from sav_ray.pipelines.fitting import init_ray
from sav_ray.pipelines.predicting import (
    accuracy,
    predict_many,
    predict_table,
    write_predictions,
)
from sav_ray.pipelines.preflight import check_model
from sav_ray.tracking.registry import is_registry_ref, load_artifact_ref, parse_ref
from sav_ray.tracking.runs import check_job_path


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = job_parser("predict", __doc__)
    p.add_argument(
        "--artifact",
        required=True,
        action="append",
        metavar="[NAME=]REF",
        help="artifact folder or models:/NAME@ALIAS; repeat for several classifiers sharing "
        "one pass of the model, each optionally named NAME= in the output",
    )
    p.add_argument("--data", required=True, help="manifest to classify (labels optional)")
    p.add_argument("--output", required=True, help="results file: .jsonl or .parquet")
    add_manifest_args(p)
    add_model_args(p, for_artifact=True)
    args = parse_job_args(p, argv)
    return args


@job_main
def main(argv: list[str] | None) -> int:
    args = parse(argv)
    check_job_path("--output", args.output)
    refs = artifact_names(args.artifact)
    artifacts = {name: load_artifact_ref(ref) for name, ref in refs.items()}
    first_name, first = next(iter(artifacts.items()))
    for name, artifact in artifacts.items():
        try:
            first.base_model.check_compatible(artifact.base_model)
        except ArtifactError:
            raise ConfigError(
                f"--artifact {refs[name]}: fitted on {artifact.base_model.describe()}, not on "
                f"the base model of --artifact {refs[first_name]} "
                f"({first.base_model.describe()}); predict them in separate runs"
            ) from None
    model, flag = artifact_model(args, first.base_model)
    table = read_manifest(args.data, manifest_fields(args), require_label=False)
    check_image_files(table)
    for prompt, _ in input_variants(list(artifacts.values()))[0]:
        first.base_model.check_compatible(check_model(model, prompt, table, flag))
    init_ray()
    if len(artifacts) == 1:
        records = predict_table(table, model, first)
        write_predictions(records, args.output)
        print(f"classified {len(records)} rows -> {args.output}")
        acc = accuracy(records)
        if acc is not None:
            print(f"accuracy {acc:.4f}")
        return 0
    records, forward_rows = predict_many(table, model, artifacts)
    write_predictions(records, args.output)
    print(
        f"classified {len(records)} rows with {len(artifacts)} artifacts in one pass of the "
        f"model ({forward_rows} forward rows) -> {args.output}"
    )
    for name in artifacts:
        acc = accuracy(records, name)
        if acc is not None:
            print(f"accuracy {acc:.4f} {name}")
    return 0


def artifact_names(values: list[str]) -> dict[str, str]:
    """--artifact values -> {name: reference}: `NAME=REF`, else the registered model's name
    or the folder's name; a name given twice is an error naming both."""
    refs: dict[str, str] = {}
    for value in values:
        name, sep, ref = value.partition("=")
        if not sep or "/" in name or ":" in name:
            ref = value
            name = parse_ref(ref)[0] if is_registry_ref(ref) else Path(ref).resolve().name
            if name == "sav":  # a fit's folder is .../NAME/sav
                name = Path(ref).resolve().parent.name
        if not name or not ref:
            raise ConfigError(f"--artifact {value!r}: give REF or NAME=REF")
        if name in refs:
            raise ConfigError(
                f"--artifact {ref} and --artifact {refs[name]} are both named {name!r} in the "
                f"output; name them: --artifact other={ref}"
            )
        refs[name] = ref
    return refs


if __name__ == "__main__":
    sys.exit(main())
