"""Classify inputs with a SAV artifact: capture only the selected heads' layers, stop the
forward pass after the deepest one, and let each selected head vote (docs/design.md, "Method").

Used by `jobs/predict.py` (Ray Data: rows preprocessed in CPU tasks), the MLflow pyfunc
wrapper and the Serve deployment (`predict_examples`: the same per-row processing and collate,
in-process), so all three give the same labels and scores. Inputs are processed with the
artifact's prompt and preprocessing (image resolution) config.

    preds = predict_examples(lm, artifact, [Example(text="What is it?", images=[img])])
    preds[0].label, preds[0].votes, preds[0].scores

Several artifacts on one base model share the forward pass (`predict_shared`): it runs to the
deepest layer any of them selected and captures the union of their layers; each artifact then
votes with its own heads. Artifacts with the same prompt and preprocessing (`input_key`) read
the same model input, so N such classifiers cost one forward row per input, not N; an artifact
with another prompt adds its own rows to the same batched pass.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sav_ray.core import calibration, reduce
from sav_ray.core.artifact import SavArtifact
from sav_ray.core.capture import capture_rows
from sav_ray.core.model_inputs import encode_row
from sav_ray.core.models import LoadedModel
from sav_ray.core.prompts import Example, PromptConfig
from sav_ray.core.resolution import Preprocessing


@dataclass(frozen=True)
class Prediction:
    label: str  # the vote's winner, or the most probable label (artifact.decision)
    votes: dict[str, int]  # heads voting for each label; they sum to k
    scores: dict[str, float]  # votes / k: per-label scores that sum to 1
    # softmax of the heads' mean cosine similarity over the artifact's temperature; None for
    # an artifact without a calibration (schema versions 1-3)
    probabilities: dict[str, float] | None = None
    decision: bool | None = None  # p(threshold's label) >= threshold; None without a threshold

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"label": self.label, "votes": self.votes, "scores": self.scores}
        if self.probabilities is not None:
            out["probabilities"] = self.probabilities
        if self.decision is not None:
            out["decision"] = self.decision
        return out


def needed_layers(artifact: SavArtifact) -> list[int]:
    """The distinct layers of the selected heads, ascending."""
    return sorted({int(layer) for layer, _ in artifact.heads})


def head_vectors(vectors: np.ndarray, layers: list[int], artifact: SavArtifact) -> np.ndarray:
    """Selected heads from vectors captured at `layers`: [n, len(layers), H, D] -> [n, k, D]."""
    position = {layer: i for i, layer in enumerate(layers)}
    heads = np.array([[position[int(layer)], int(head)] for layer, head in artifact.heads])
    return reduce.gather_heads(vectors, heads)  # [n, k, head_dim]


def predictions(artifact: SavArtifact, vectors_k: np.ndarray) -> list[Prediction]:
    """Vote with the selected heads' vectors [n, k, head_dim]; with the artifact's calibration,
    also the probabilities (and its threshold's decision)."""
    votes = reduce.classify(vectors_k, artifact.centroids)
    labels = artifact.labels
    probs = None
    if artifact.calibration is not None:
        probs = calibration.probabilities(
            vectors_k, artifact.centroids, artifact.calibration.temperature
        )  # [n, class]
    winner = votes.label_idx if artifact.decision == "vote" else probs.argmax(axis=1)
    threshold = artifact.threshold
    out = []
    for i in range(len(vectors_k)):
        p = None if probs is None else dict(zip(labels, map(float, probs[i]), strict=True))
        out.append(
            Prediction(
                label=labels[int(winner[i])],
                votes={lab: int(v) for lab, v in zip(labels, votes.votes[i], strict=True)},
                scores={lab: float(s) for lab, s in zip(labels, votes.scores[i], strict=True)},
                probabilities=p,
                decision=None
                if threshold is None or p is None
                else bool(p[threshold.positive_label] >= threshold.threshold),
            )
        )
    return out


def input_key(artifact: SavArtifact) -> str:
    """What decides an artifact's model input for a given example: its prompt and preprocessing.
    Artifacts with equal keys can read the same forward row."""
    return input_key_of(artifact.prompt, artifact.preprocessing)


def input_key_of(prompt: PromptConfig, preprocessing: Preprocessing) -> str:
    return json.dumps([prompt.to_dict(), preprocessing.to_dict()], sort_keys=True)


def input_variants(
    artifacts: Sequence[SavArtifact],
) -> tuple[list[tuple[PromptConfig, Preprocessing]], list[int]]:
    """The distinct (prompt, preprocessing) pairs the artifacts need, in order of first use,
    and the index of each artifact's pair: a data set is encoded once per pair."""
    variants: list[tuple[PromptConfig, Preprocessing]] = []
    index: dict[str, int] = {}
    variant_of = []
    for artifact in artifacts:
        key = input_key(artifact)
        if key not in index:
            index[key] = len(variants)
            variants.append((artifact.prompt, artifact.preprocessing))
        variant_of.append(index[key])
    return variants, variant_of


def union_layers(artifacts: Sequence[SavArtifact]) -> list[int]:
    """The layers any of the artifacts selected a head in, ascending."""
    return sorted({layer for a in artifacts for layer in needed_layers(a)})


def predict_shared(
    lm: LoadedModel,
    artifacts: Sequence[SavArtifact],
    rows: list[dict[str, torch.Tensor]],
    rows_of: Sequence[Sequence[int]],
    seconds: dict[str, float] | None = None,
) -> list[list[Prediction]]:
    """ONE forward pass over `rows` (of `encode_row`) for several artifacts on the same base
    model, stopped after the deepest layer any of them needs; `rows_of[a]` lists the rows
    artifact `a` classifies. Returns, per artifact, its predictions in `rows_of[a]` order: the
    same as `predict_rows(lm, artifact, [rows[i] for i in rows_of[a]])`. `seconds`, if given,
    gets the time spent in the forward pass and in voting added to its "forward" and "vote"."""
    layers = union_layers(artifacts)
    captured = capture_rows(lm, rows, layers=layers, early_exit=True)
    started = time.perf_counter()
    out = [
        predictions(a, head_vectors(captured.vectors[list(idx)], layers, a))  # [n, k, D]
        for a, idx in zip(artifacts, rows_of, strict=True)
    ]
    if seconds is not None:
        seconds["forward"] = seconds.get("forward", 0.0) + captured.forward_seconds
        seconds["vote"] = seconds.get("vote", 0.0) + time.perf_counter() - started
    return out


def predict_rows(
    lm: LoadedModel, artifact: SavArtifact, rows: list[dict[str, torch.Tensor]]
) -> list[Prediction]:
    """One forward pass over rows of `encode_row`, stopped after the deepest selected layer."""
    return predict_shared(lm, [artifact], rows, [range(len(rows))])[0]


def predict_examples(
    lm: LoadedModel, artifact: SavArtifact, examples: list[Example]
) -> list[Prediction]:
    """One forward pass per example, stopped after the deepest selected layer."""
    rows = [
        encode_row(lm.processor, ex, artifact.prompt, artifact.preprocessing) for ex in examples
    ]
    return predict_rows(lm, artifact, rows)
