"""Stage: the model actor. Holds one frozen model; turns preprocessed rows into head vectors.

The rows arrive as ready model inputs (`sav_ray.pipelines.preprocess`, made in CPU tasks), so the actor
only collates (pads), moves to its device, runs the forward pass and captures
(`capture_rows`). Heavy imports and the model load happen in `__init__` (once per actor);
`__call__` maps a batch to
`{row, id, label, vectors [batch, layer, head, head_dim], forward_rows, model_info,
forward_seconds, busy_seconds}` (`model_info`: the loaded model's BaseModelInfo as JSON, so the
driver never loads the model).

`forward_rows` makes the one-forward-pass-per-example promise checkable: a hook on the first
decoder layer counts the rows the model actually ran during the batch, shared over its rows.
`forward_seconds` (the model's forward pass) and `busy_seconds` (all of `__call__`: unpacking,
collate, move, forward, capture, output) are the batch's times shared over its rows, so their
sums over the dataset give the share of the actor's busy time spent in the forward pass.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from sav_ray.core.capture import capture_rows
from sav_ray.core.errors import report_init_errors
from sav_ray.pipelines.config import ModelConfig
from sav_ray.pipelines.preprocess import rows_of

OUTPUT_COLUMNS = (
    "row",
    "id",
    "label",
    "vectors",
    "forward_rows",
    "model_info",
    "placement",
    "forward_seconds",
    "busy_seconds",
)


@report_init_errors
class ExtractVectors:
    """Ray Data actor: `map_batches(ExtractVectors, fn_constructor_kwargs=..., compute=...)`."""

    def __init__(self, model: ModelConfig, vectors_dtype: str = "float32") -> None:
        from sav_ray.core.models import decoder_layers
        from sav_ray.pipelines.placement import load_actor_model

        self.lm = load_actor_model(model)
        self.vectors_dtype = np.dtype(vectors_dtype)
        self._info_json = json.dumps(self.lm.info.to_dict(), sort_keys=True)
        self._rows_run = 0
        first_layer = decoder_layers(self.lm.model)[0]
        first_layer.register_forward_pre_hook(self._count_rows, with_kwargs=True)

    def _count_rows(self, module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # [batch, seq, hidden]
        self._rows_run += hidden.shape[0]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        before = self._rows_run
        captured = capture_rows(self.lm, rows_of(batch))
        vectors = captured.vectors.astype(self.vectors_dtype, copy=False)  # [batch, L, H, D]
        n = len(vectors)
        return {
            "row": batch["row"],
            "id": batch["id"],
            "label": batch["label"],
            "vectors": vectors,
            "forward_rows": np.full(n, (self._rows_run - before) / n, dtype=np.float64),
            "model_info": np.full(n, self._info_json, dtype=object),
            "placement": np.full(n, json.dumps(self.lm.placement), dtype=object),
            "forward_seconds": np.full(n, captured.forward_seconds / n),
            "busy_seconds": np.full(n, (time.perf_counter() - started) / n),
        }
