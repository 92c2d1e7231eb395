"""Classify inputs with a SAV artifact: capture only the selected heads' layers, stop the
forward pass after the deepest one, and let each selected head vote (DESIGN.md).

Used by `jobs/predict.py` (Ray Data: `predict_rows` on rows preprocessed in CPU tasks), the
MLflow pyfunc wrapper and the Serve deployment (`predict_examples`: the same per-row processing
and collate, in-process), so all three give the same labels and scores. Inputs are processed
with the artifact's prompt and preprocessing (image resolution) config.

    preds = predict_examples(lm, artifact, [Example(text="What is it?", images=[img])])
    preds[0].label, preds[0].votes, preds[0].scores
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sav_ray import reduce
from sav_ray.artifact import SavArtifact
from sav_ray.capture import capture_rows
from sav_ray.model_inputs import encode_row
from sav_ray.models import LoadedModel
from sav_ray.prompts import Example


@dataclass(frozen=True)
class Prediction:
    label: str
    votes: dict[str, int]  # heads voting for each label; they sum to k
    scores: dict[str, float]  # votes / k: per-label scores that sum to 1

    def to_dict(self) -> dict[str, object]:
        return {"label": self.label, "votes": self.votes, "scores": self.scores}


def needed_layers(artifact: SavArtifact) -> list[int]:
    """The distinct layers of the selected heads, ascending."""
    return sorted({int(layer) for layer, _ in artifact.heads})


def head_vectors(vectors: np.ndarray, layers: list[int], artifact: SavArtifact) -> np.ndarray:
    """Selected heads from vectors captured at `layers`: [n, len(layers), H, D] -> [n, k, D]."""
    position = {layer: i for i, layer in enumerate(layers)}
    heads = np.array([[position[int(layer)], int(head)] for layer, head in artifact.heads])
    return reduce.gather_heads(vectors, heads)  # [n, k, head_dim]


def predictions(artifact: SavArtifact, vectors_k: np.ndarray) -> list[Prediction]:
    """Vote with the selected heads' vectors [n, k, head_dim]."""
    votes = reduce.classify(vectors_k, artifact.centroids)
    labels = artifact.labels
    return [
        Prediction(
            label=labels[int(votes.label_idx[i])],
            votes={lab: int(v) for lab, v in zip(labels, votes.votes[i], strict=True)},
            scores={lab: float(s) for lab, s in zip(labels, votes.scores[i], strict=True)},
        )
        for i in range(len(vectors_k))
    ]


def predict_rows(
    lm: LoadedModel, artifact: SavArtifact, rows: list[dict[str, torch.Tensor]]
) -> list[Prediction]:
    """One forward pass over rows of `encode_row`, stopped after the deepest selected layer."""
    layers = needed_layers(artifact)
    vectors = capture_rows(lm, rows, layers=layers, early_exit=True).vectors
    return predictions(artifact, head_vectors(vectors, layers, artifact))


def predict_examples(
    lm: LoadedModel, artifact: SavArtifact, examples: list[Example]
) -> list[Prediction]:
    """One forward pass per example, stopped after the deepest selected layer."""
    rows = [
        encode_row(lm.processor, ex, artifact.prompt, artifact.preprocessing) for ex in examples
    ]
    return predict_rows(lm, artifact, rows)
