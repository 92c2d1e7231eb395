"""Classify a manifest with a SAV artifact on Ray Data; write one result per row.

    python jobs/predict.py --artifact /abs/sav --data data/demo/test.jsonl --output preds.jsonl

Each result has `row`, `id`, `label` (predicted), `votes` and `scores` per label, and
`true_label` when the manifest has one; the accuracy is printed when it does. The base model
is the artifact's own (`--model` overrides its location, e.g. a local mirror; its geometry and
revision must still match).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from sav_ray.config import ModelConfig, add_model_args, add_video_field_arg  # noqa: E402
from sav_ray.errors import job_main  # noqa: E402
from sav_ray.fitting import init_ray  # noqa: E402
from sav_ray.manifest import ManifestFields, check_image_files, read_manifest  # noqa: E402
from sav_ray.predicting import accuracy, predict_table, write_predictions  # noqa: E402
from sav_ray.preflight import check_model  # noqa: E402
from sav_ray.registry import load_artifact_ref  # noqa: E402
from sav_ray.tracking import check_job_path  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/predict.py", description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True, help="artifact folder or models:/NAME@ALIAS")
    p.add_argument("--data", required=True, help="manifest to classify (labels optional)")
    p.add_argument("--output", required=True, help="results file: .jsonl or .parquet")
    p.add_argument("--image-field", default="image", help="'' for text-only rows")
    p.add_argument("--text-field", default="question")
    p.add_argument("--label-field", default="label")
    p.add_argument("--id-field", default=None)
    add_video_field_arg(p)
    add_model_args(p)
    return p.parse_args(argv)


@job_main
def main(argv: list[str] | None) -> int:
    args = parse(argv)
    check_job_path("--output", args.output)
    artifact = load_artifact_ref(args.artifact)
    model = ModelConfig.from_namespace(args)
    flag = "--model"
    if not model.model:
        base = artifact.base_model
        model = replace(model, model=base.name_or_path, revision=model.revision or base.revision)
        flag = "the artifact's base model"
    fields_ = ManifestFields.from_flags(
        args.image_field, args.text_field, args.label_field, args.id_field, args.video_field
    )
    table = read_manifest(args.data, fields_, require_label=False)
    check_image_files(table)
    artifact.base_model.check_compatible(check_model(model, artifact.prompt, table, flag))
    init_ray()
    records = predict_table(table, model, artifact)
    write_predictions(records, args.output)
    acc = accuracy(records)
    print(f"classified {len(records)} rows -> {args.output}")
    if acc is not None:
        print(f"accuracy {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
