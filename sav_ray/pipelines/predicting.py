"""Batch prediction on Ray Data: manifest -> model inputs (CPU tasks) -> classifier actors -> results.

Rows are preprocessed with the artifact's prompt and resolution config. The actor holds the
base model and the artifacts (each checked against the model on load) and runs
`predict_shared`: ONE forward pass per row for all artifacts, stopped after the deepest layer
any of them selected. Artifacts whose prompt or preprocessing differ get their own encoded
column (`preprocess_rows`'s `more_inputs`) and their own rows in the same batched pass.
Results (one small record per row) are collected on the driver and written as Parquet or JSONL.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sav_ray.core.artifact import SavArtifact
from sav_ray.core.errors import ConfigError, report_init_errors
from sav_ray.pipelines.config import ModelConfig
from sav_ray.pipelines.preprocess import object_column, rows_of


@report_init_errors
class ClassifyRows:
    """Ray Data actor: preprocessed rows -> `{row, id, true_label, prediction (JSON),
    forward_rows}`. For one artifact `prediction` is its prediction; for a list of artifacts, the
    list of their predictions in order. `forward_rows`: the rows the model ran for the batch
    (counted by a hook on its first decoder layer), on the batch's first row, 0 on the others."""

    def __init__(self, model: ModelConfig, artifacts: SavArtifact | Sequence[SavArtifact]) -> None:
        from sav_ray.core.capture import LayerCounter
        from sav_ray.core.classify import input_variants
        from sav_ray.pipelines.placement import load_actor_model

        self.single = isinstance(artifacts, SavArtifact)
        self.artifacts = [artifacts] if self.single else list(artifacts)
        self.lm = load_actor_model(model, expect=self.artifacts[0].base_model)
        for artifact in self.artifacts[1:]:
            artifact.base_model.check_compatible(self.lm.info)
        self.variant_of = input_variants(self.artifacts)[1]
        self.counter = LayerCounter(self.lm.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from sav_ray.core.classify import predict_shared

        n = len(batch["row"])
        rows, offset = [], {}
        for variant in sorted(set(self.variant_of)):
            offset[variant] = len(rows)
            rows += rows_of(batch, variant)
        before = self.counter.rows
        preds = predict_shared(
            self.lm,
            self.artifacts,
            rows,
            [range(offset[v], offset[v] + n) for v in self.variant_of],
        )  # [artifact][row]
        forward_rows = np.zeros(n, dtype=np.int64)
        forward_rows[:1] = self.counter.rows - before
        per_row = [
            preds[0][i].to_dict() if self.single else [p[i].to_dict() for p in preds]
            for i in range(n)
        ]
        return {
            "row": batch["row"],
            "id": batch["id"],
            "true_label": batch["label"],
            "prediction": object_column([json.dumps(p) for p in per_row]),
            "forward_rows": forward_rows,
        }


def _classified(table: Any, model: ModelConfig, artifacts: list[SavArtifact]) -> list[dict]:
    """ClassifyRows' output rows for the whole manifest, in manifest order."""
    from sav_ray.core.classify import input_variants
    from sav_ray.pipelines.fitting import preprocessed_dataset
    from sav_ray.pipelines.placement import actor_pool

    variants, _ = input_variants(artifacts)
    (prompt, prep), *more = variants
    ds = preprocessed_dataset(table, model, prompt, prep, more_inputs=more).map_batches(
        ClassifyRows,
        fn_constructor_kwargs={"model": model, "artifacts": artifacts},
        batch_size=model.batch_size,
        **actor_pool(model),
    )
    return sorted(ds.take_all(), key=lambda r: int(r["row"]))


def _record(r: dict[str, Any]) -> dict[str, Any]:
    return {"row": int(r["row"]), "id": str(r["id"]), "true_label": r["true_label"]}


def predict_table(table: Any, model: ModelConfig, artifact: SavArtifact) -> list[dict[str, Any]]:
    """Classify every manifest row; returns records in manifest order: row, id, true_label,
    label, votes, scores."""
    return [
        {**_record(r), **json.loads(r["prediction"])[0]}
        for r in _classified(table, model, [artifact])
    ]


def predict_many(
    table: Any, model: ModelConfig, artifacts: dict[str, SavArtifact]
) -> tuple[list[dict[str, Any]], int]:
    """Classify every manifest row with several artifacts on one base model, in one pass of the
    model: records in manifest order with row, id, true_label and, under each artifact's name,
    its label, votes and scores; and the forward rows the model ran (one per manifest row when
    the artifacts share their prompt and preprocessing)."""
    names = list(artifacts)
    rows = _classified(table, model, list(artifacts.values()))
    records = [
        {**_record(r), **dict(zip(names, json.loads(r["prediction"]), strict=True))} for r in rows
    ]
    return records, sum(int(r["forward_rows"]) for r in rows)


def accuracy(records: list[dict[str, Any]], name: str | None = None) -> float | None:
    """Fraction of labelled rows predicted right (by the artifact `name` of `predict_many`'s
    records); None when no row has a label."""
    labelled = [r for r in records if r["true_label"] not in (None, "")]
    if not labelled:
        return None
    return sum((r[name] if name else r)["label"] == r["true_label"] for r in labelled) / len(
        labelled
    )


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
