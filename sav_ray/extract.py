"""Stage: the model actor. Holds one frozen model; turns decoded rows into head vectors.

A thin callable around `capture_examples`: heavy imports and the model load happen in
`__init__` (once per actor); `__call__` maps a batch of decoded rows to
`{row, id, label, vectors [batch, layer, head, head_dim], forward_rows, model_info}`
(`model_info`: the loaded model's BaseModelInfo as JSON, so the driver never loads the model).

`forward_rows` makes the one-forward-pass-per-example promise checkable: a hook on the first
decoder layer counts the rows the model actually ran during the batch, shared over its rows.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from sav_ray.capture import capture_examples
from sav_ray.config import ModelConfig
from sav_ray.decode import examples_of
from sav_ray.errors import report_init_errors
from sav_ray.prompts import PromptConfig

OUTPUT_COLUMNS = ("row", "id", "label", "vectors", "forward_rows", "model_info", "placement")


@report_init_errors
class ExtractVectors:
    """Ray Data actor: `map_batches(ExtractVectors, fn_constructor_kwargs=..., compute=...)`."""

    def __init__(
        self,
        model: ModelConfig,
        prompt: dict[str, Any],
        vectors_dtype: str = "float32",
    ) -> None:
        from sav_ray.models import load_actor_model

        self.lm = load_actor_model(model)
        self.prompt = PromptConfig.from_dict(prompt)
        self.vectors_dtype = np.dtype(vectors_dtype)
        self._info_json = json.dumps(self.lm.info.to_dict(), sort_keys=True)
        self._rows_run = 0
        first_layer = self.lm.model.get_decoder().layers[0]
        first_layer.register_forward_pre_hook(self._count_rows, with_kwargs=True)

    def _count_rows(self, module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # [batch, seq, hidden]
        self._rows_run += hidden.shape[0]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        examples = examples_of(batch)
        before = self._rows_run
        vectors = capture_examples(self.lm, examples, self.prompt)  # [batch, layer, head, head_dim]
        n = len(examples)
        return {
            "row": batch["row"],
            "id": batch["id"],
            "label": batch["label"],
            "vectors": vectors.astype(self.vectors_dtype, copy=False),
            "forward_rows": np.full(n, (self._rows_run - before) / n, dtype=np.float64),
            "model_info": np.full(n, self._info_json, dtype=object),
            "placement": np.full(n, json.dumps(self.lm.placement), dtype=object),
        }
