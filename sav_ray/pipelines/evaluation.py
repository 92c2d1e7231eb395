"""Evaluation: a SAV against two baselines on the same labelled rows, on Ray Data.

Three methods see every row:
- `sav`: the artifact's k selected heads vote (as jobs/predict.py and the server do).
- `all_heads`: every head of the model votes for its nearest class centroid (cosine), with
  centroids of all L x H heads from the training set: what head selection adds. A tie goes to
  the tied class that the lowest (layer, head) voted for.
- `zero_shot`: the base model generates up to `max_new_tokens` tokens for the row's prompt
  (the artifact's prompt, greedy); the prediction is the label the answer names, as a whole
  word, case-insensitive, the earliest mention winning (the paper matches labels in the
  generated text). An answer naming no label counts as wrong.

The artifact holds only the k selected heads' centroids, so the all-heads centroids are
recomputed from the training rows with the fit's own first pass (`all_heads_centroids`):
one extra model pass over the training manifest, or none from a saved vectors dataset.

The baselines are optional (`jobs/evaluate.py --baselines`): `all_heads` needs training
vectors, `zero_shot` a generation per batch.

Metrics (pure numpy): accuracy, macro-F1, per-class recall, the confusion matrix, and the
expected calibration error of the vote shares (the top score as confidence, 10 equal bins)
and, for an artifact with probabilities, of the probabilities (the top probability). With a
positive label (`binary_report`): ROC-AUC and PR-AUC of its probability, the threshold that
reaches a target precision or recall on these rows, and what the artifact's stored threshold
reaches on them.

    centroids = all_heads_centroids(artifact, model, train_table=train)    # [class, L, H, D]
    records = evaluate_table(test, model, artifact, centroids)             # one row per row
    report = summarize(records, artifact.labels)                           # method -> Metrics
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from sav_ray.core import calibration, reduce
from sav_ray.core.artifact import BaseModelInfo, SavArtifact
from sav_ray.core.calibration import expected_calibration_error
from sav_ray.core.errors import report_init_errors
from sav_ray.core.manifest import ManifestError
from sav_ray.core.resolution import Preprocessing
from sav_ray.pipelines.config import ModelConfig
from sav_ray.pipelines.preprocess import rows_of

METHODS = ("sav", "all_heads", "zero_shot")
NO_LABEL = -1  # a zero-shot answer naming no label


@dataclass(eq=False)
class Metrics:
    labels: list[str]
    confusion: np.ndarray  # [true, predicted] int64; answers naming no label are left out
    accuracy: float
    macro_f1: float  # over the classes that occur as true or predicted labels
    recall: dict[str, float]  # per class present in the data
    ece: float | None  # None for a method without scores (zero-shot)
    rows: int
    ece_probabilities: float | None = None  # the SAV's probabilities, where it has them

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "confusion": self.confusion.tolist(),
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "recall": self.recall,
            "ece": self.ece,
            "ece_probabilities": self.ece_probabilities,
            "rows": self.rows,
        }


def confusion_matrix(true_idx: np.ndarray, pred_idx: np.ndarray, num_classes: int) -> np.ndarray:
    """[true, predicted] counts; predictions equal to NO_LABEL are not counted."""
    true_idx, pred_idx = np.asarray(true_idx), np.asarray(pred_idx)  # [n], [n]
    answered = pred_idx != NO_LABEL
    out = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(out, (true_idx[answered], pred_idx[answered]), 1)
    return out


def compute_metrics(
    labels: list[str],
    true_idx: np.ndarray,
    pred_idx: np.ndarray,
    confidence: np.ndarray | None = None,
) -> Metrics:
    """true_idx, pred_idx [n] class indices (pred may be NO_LABEL); confidence [n] or None."""
    true_idx, pred_idx = np.asarray(true_idx), np.asarray(pred_idx)
    if true_idx.shape != pred_idx.shape or true_idx.size == 0:
        raise ValueError(f"need equal non-empty shapes, got {true_idx.shape}, {pred_idx.shape}")
    c = len(labels)
    confusion = confusion_matrix(true_idx, pred_idx, c)
    hits = np.diag(confusion).astype(np.float64)  # [class]
    true_count = np.bincount(true_idx, minlength=c).astype(np.float64)  # [class]
    pred_count = confusion.sum(axis=0).astype(np.float64)  # [class]
    recall = np.divide(hits, true_count, out=np.zeros(c), where=true_count > 0)
    precision = np.divide(hits, pred_count, out=np.zeros(c), where=pred_count > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(c), where=denom > 0)
    present = (true_count > 0) | (pred_count > 0)
    correct = pred_idx == true_idx
    return Metrics(
        labels=list(labels),
        confusion=confusion,
        accuracy=float(correct.mean()),
        macro_f1=float(f1[present].mean()),
        recall={labels[i]: float(recall[i]) for i in range(c) if true_count[i] > 0},
        ece=None if confidence is None else expected_calibration_error(confidence, correct),
        rows=int(true_idx.size),
    )


def match_label(answer: str, labels: list[str]) -> int:
    """Index of the label the answer names first (whole word, any case), else NO_LABEL.

    At the same position the longer label wins ("red car" over "red").
    """
    best, best_key = NO_LABEL, (len(answer) + 1, 0)
    for i, label in enumerate(labels):
        found = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", answer, flags=re.IGNORECASE)
        if found and (found.start(), -len(label)) < best_key:
            best, best_key = i, (found.start(), -len(label))
    return best


def all_heads_votes(vectors: np.ndarray, centroids: np.ndarray) -> reduce.Votes:
    """Every head votes: vectors [n, layer, head, head_dim], centroids [class, layer, head, head_dim]."""
    n, num_layers, num_heads, head_dim = vectors.shape
    flat = vectors.reshape(n, num_layers * num_heads, head_dim)  # [n, layer*head, head_dim]
    return reduce.classify(flat, centroids.reshape(len(centroids), -1, head_dim))


def generate_answers(lm: Any, inputs: dict[str, Any], max_new_tokens: int) -> list[str]:
    """The base model's greedy answers (new tokens only, decoded) to a left-padded batch
    (`sav_ray.core.model_inputs.collate`): generation continues every row from the last column."""
    import torch

    from sav_ray.core.model_inputs import forward_inputs

    inputs = {k: v.to(lm.input_device) for k, v in forward_inputs(lm.model, inputs).items()}
    with torch.inference_mode():
        out = lm.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=lm.processor.tokenizer.pad_token_id,
        )  # [batch, prompt + new]
    new = out[:, inputs["input_ids"].shape[1] :]  # [batch, new]
    return lm.processor.batch_decode(new, skip_special_tokens=True)


@report_init_errors
class EvaluateRows:
    """Ray Data actor: preprocessed rows -> each method's predictions for each row.

    One capture (every head when the all-heads baseline runs, else only the selected heads'
    layers) and, for the zero-shot baseline, one generation per batch, both from the same
    collated inputs (the artifact's prompt and resolution).
    """

    def __init__(
        self,
        model: ModelConfig,
        artifact: SavArtifact,
        centroids: np.ndarray | None,  # [class, layer, head, head_dim]; None: no all-heads
        max_new_tokens: int,
        zero_shot: bool = True,
    ) -> None:
        from sav_ray.pipelines.placement import load_actor_model

        self.lm = load_actor_model(model, expect=artifact.base_model)
        self.artifact = artifact
        self.centroids = centroids
        self.max_new_tokens = max_new_tokens
        self.zero_shot = zero_shot

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json

        from sav_ray.core.capture import capture_rows
        from sav_ray.core.classify import head_vectors, needed_layers, predictions
        from sav_ray.core.model_inputs import collate

        rows = rows_of(batch)
        art = self.artifact
        index = {label: i for i, label in enumerate(art.labels)}
        out = {"row": batch["row"], "id": batch["id"], "true_label": batch["label"]}
        if self.centroids is not None:
            vectors = capture_rows(self.lm, rows).vectors  # [batch, layer, head, head_dim]
            layers = list(range(vectors.shape[1]))
            every = all_heads_votes(vectors, self.centroids)
            out["all_heads"] = every.label_idx
            out["all_heads_confidence"] = every.scores.max(axis=1)
        else:
            layers = needed_layers(art)
            vectors = capture_rows(self.lm, rows, layers=layers, early_exit=True).vectors
        preds = predictions(art, head_vectors(vectors, layers, art))
        out["sav"] = np.array([index[p.label] for p in preds], dtype=np.int64)
        out["sav_confidence"] = np.array([max(p.scores.values()) for p in preds])
        if art.calibration is not None:
            out["sav_probabilities"] = np.array(
                [json.dumps([p.probabilities[lab] for lab in art.labels]) for p in preds],
                dtype=object,
            )
        if self.zero_shot:
            inputs = collate(rows, self.lm.processor.tokenizer.pad_token_id)
            answers = generate_answers(self.lm, inputs, self.max_new_tokens)
            out["zero_shot"] = np.array(
                [match_label(a, art.labels) for a in answers], dtype=np.int64
            )
            out["zero_shot_answer"] = np.array(answers, dtype=object)
        return out


def check_labels(table: Any, labels: list[str], flag: str) -> None:
    """Every row of the manifest must have one of the artifact's labels."""
    known = set(labels)
    for row, label in zip(
        table.column("row").to_pylist(), table.column("label").to_pylist(), strict=True
    ):
        if label is None or label not in known:
            raise ManifestError(
                f"{flag}: row {row} has label {label!r}, which the SAV does not know "
                f"(its labels: {labels}); evaluate on rows labelled with these"
            )


def all_heads_centroids(
    artifact: SavArtifact,
    model: ModelConfig,
    *,
    train_table: Any = None,
    vectors_dir: str | None = None,
) -> np.ndarray:
    """Class centroids of every head, [class, layer, head, head_dim], in the artifact's label
    order: one model pass over `train_table`, or a pass over the saved vectors in `vectors_dir`."""
    from sav_ray.pipelines import fitting

    labels = tuple(artifact.labels)
    if vectors_dir:
        ds, meta = fitting.read_vectors(vectors_dir)
        if set(meta["labels"]) != set(labels):
            raise ManifestError(
                f"--train-vectors {vectors_dir}: labels {meta['labels']} differ from the "
                f"SAV's {list(labels)}; give the vectors its fit used"
            )
        artifact.base_model.check_compatible(BaseModelInfo.from_dict(meta["base_model"]))
        taken_at = Preprocessing.from_dict(meta.get("preprocessing"))
        if taken_at != artifact.preprocessing:
            raise ManifestError(
                f"--train-vectors {vectors_dir}: taken at image resolution {taken_at.to_dict()}, "
                f"but the SAV was fitted at {artifact.preprocessing.to_dict()}; give the vectors "
                "its fit used"
            )
    else:
        check_labels(train_table, artifact.labels, "--train")
        ds = fitting.vectors_dataset(
            train_table, model, artifact.prompt, "float32", artifact.preprocessing
        )
    first = fitting.first_pass(ds, labels)
    sums, info = first.sums, first.info
    if info is not None:
        artifact.base_model.check_compatible(info)
    return sums.centroids()  # [class, layer, head, head_dim]


def evaluate_table(
    table: Any,
    model: ModelConfig,
    artifact: SavArtifact,
    centroids: np.ndarray | None,
    max_new_tokens: int = 8,
    zero_shot: bool = True,
) -> list[dict[str, Any]]:
    """Every row's predictions by the SAV and the baselines asked for (all heads when given
    their `centroids`, zero-shot when `zero_shot`), in manifest order."""
    from sav_ray.pipelines.fitting import preprocessed_dataset
    from sav_ray.pipelines.placement import actor_pool

    ds = preprocessed_dataset(table, model, artifact.prompt, artifact.preprocessing).map_batches(
        EvaluateRows,
        fn_constructor_kwargs={
            "model": model,
            "artifact": artifact,
            "centroids": centroids,
            "max_new_tokens": max_new_tokens,
            "zero_shot": zero_shot,
        },
        batch_size=model.batch_size,
        **actor_pool(model),
    )
    return sorted(ds.take_all(), key=lambda r: int(r["row"]))


def summarize(records: list[dict[str, Any]], labels: list[str]) -> dict[str, Metrics]:
    """Method -> Metrics over the records of `evaluate_table`."""
    index = {label: i for i, label in enumerate(labels)}
    true_idx = np.array([index[str(r["true_label"])] for r in records], dtype=np.int64)  # [n]
    report = {}
    for method in METHODS:
        if method not in records[0]:
            continue  # a baseline that was not run
        pred = np.array([int(r[method]) for r in records], dtype=np.int64)  # [n]
        conf_key = f"{method}_confidence"
        confidence = (
            np.array([float(r[conf_key]) for r in records]) if conf_key in records[0] else None
        )
        report[method] = compute_metrics(labels, true_idx, pred, confidence)
    probs = sav_probabilities(records)
    if probs is not None:
        report["sav"].ece_probabilities = expected_calibration_error(
            probs.max(axis=1), probs.argmax(axis=1) == true_idx
        )
    return report


def sav_probabilities(records: list[dict[str, Any]]) -> np.ndarray | None:
    """[n, class] the SAV's probabilities of `evaluate_table`'s records; None without them."""
    import json

    if "sav_probabilities" not in records[0]:
        return None
    return np.array([json.loads(r["sav_probabilities"]) for r in records], dtype=np.float64)


def binary_report(
    records: list[dict[str, Any]],
    labels: list[str],
    positive_label: str,
    target: str | None = None,
    value: float | None = None,
    stored: calibration.Threshold | None = None,
) -> dict[str, float]:
    """One label against the rest, scored by its probability: ROC-AUC, PR-AUC (average
    precision), the threshold reaching `target` (precision or recall) `value` on these rows,
    and the precision and recall of the artifact's `stored` threshold on them."""
    probs = sav_probabilities(records)
    if probs is None:
        raise ManifestError(
            "--positive-label needs probabilities: this SAV was fitted before they existed; "
            "re-fit it"
        )
    if positive_label not in labels:
        raise ManifestError(f"--positive-label {positive_label!r}: not a label of the SAV {labels}")
    c = labels.index(positive_label)
    scores = probs[:, c]
    positive = np.array([str(r["true_label"]) == positive_label for r in records])
    out = {
        "roc_auc": calibration.roc_auc(scores, positive),
        "pr_auc": calibration.average_precision(scores, positive),
        "positives": float(positive.sum()),
    }
    if target is not None:
        try:
            t, precision, recall = calibration.choose_threshold(scores, positive, target, value)
            out |= {"threshold": t, "threshold_precision": precision, "threshold_recall": recall}
        except ValueError as e:
            out["threshold_note"] = str(e)  # type: ignore[assignment]
    if stored is not None and stored.positive_label == positive_label:
        called = scores >= stored.threshold
        tp = float((called & positive).sum())
        out |= {
            "stored_threshold": stored.threshold,
            "stored_precision": tp / max(float(called.sum()), 1.0),
            "stored_recall": tp / max(float(positive.sum()), 1.0),
        }
    return out


def format_table(report: dict[str, Metrics], k: int, num_heads: int) -> str:
    """The methods side by side, as printed by jobs/evaluate.py."""
    names = {
        "sav": f"SAV (k={k} heads)",
        "all_heads": f"all heads ({num_heads}) vote",
        "zero_shot": "zero-shot (generate, match label)",
    }
    lines = [f"{'method':<36}{'accuracy':>10}{'macro-F1':>10}{'ECE':>8}{'ECE(p)':>8}"]
    for method, m in report.items():
        ece = "-" if m.ece is None else f"{m.ece:.3f}"
        ece_p = "-" if m.ece_probabilities is None else f"{m.ece_probabilities:.3f}"
        lines.append(
            f"{names.get(method, method):<36}{m.accuracy:>10.3f}{m.macro_f1:>10.3f}{ece:>8}"
            f"{ece_p:>8}"
        )
    return "\n".join(lines)
