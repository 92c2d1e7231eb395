"""Batch prediction on Ray Data: manifest -> model inputs (CPU tasks) -> classifier actors -> results.

Rows are preprocessed with the artifact's prompt and resolution config. The actor holds the
base model and one artifact (checked against the model on load) and runs `predict_rows`: one
forward pass per row, stopped after the deepest selected layer.
Results (one small record per row) are collected on the driver and written as Parquet or JSONL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sav_ray.artifact import SavArtifact
from sav_ray.config import ModelConfig
from sav_ray.errors import ConfigError, report_init_errors
from sav_ray.preprocess import object_column, rows_of


@report_init_errors
class ClassifyRows:
    """Ray Data actor: preprocessed rows -> `{row, id, true_label, prediction (JSON)}`."""

    def __init__(self, model: ModelConfig, artifact: SavArtifact) -> None:
        from sav_ray.models import load_actor_model

        self.lm = load_actor_model(model, expect=artifact.base_model)
        self.artifact = artifact

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from sav_ray.classify import predict_rows

        preds = predict_rows(self.lm, self.artifact, rows_of(batch))
        return {
            "row": batch["row"],
            "id": batch["id"],
            "true_label": batch["label"],
            "prediction": object_column([json.dumps(p.to_dict()) for p in preds]),
        }


def predict_table(table: Any, model: ModelConfig, artifact: SavArtifact) -> list[dict[str, Any]]:
    """Classify every manifest row; returns records in manifest order."""
    from sav_ray.fitting import preprocessed_dataset
    from sav_ray.placement import actor_pool

    ds = preprocessed_dataset(table, model, artifact.prompt, artifact.preprocessing).map_batches(
        ClassifyRows,
        fn_constructor_kwargs={"model": model, "artifact": artifact},
        batch_size=model.batch_size,
        **actor_pool(model),
    )
    records = []
    for r in ds.take_all():
        pred = json.loads(r["prediction"])
        records.append(
            {"row": int(r["row"]), "id": str(r["id"]), "true_label": r["true_label"], **pred}
        )
    return sorted(records, key=lambda rec: rec["row"])


def accuracy(records: list[dict[str, Any]]) -> float | None:
    """Fraction of labelled rows predicted right; None when no row has a label."""
    labelled = [r for r in records if r["true_label"] not in (None, "")]
    if not labelled:
        return None
    return sum(r["label"] == r["true_label"] for r in labelled) / len(labelled)


def write_predictions(records: list[dict[str, Any]], path: str | Path) -> None:
    """`.jsonl` (one JSON object per row) or `.parquet` (votes and scores as structs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        raise ConfigError(f"--output {path}: use a .jsonl or .parquet file name")
