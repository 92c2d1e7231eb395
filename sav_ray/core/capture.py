"""Capture: every head's attention output at the last real prompt token, in one forward pass.

One context manager, `HeadCapture`, owns forward pre-hooks on the chosen layers' `o_proj`.
The input of `o_proj` is the heads' outputs concatenated, `[batch, seq, head * head_dim]`;
the hook keeps only each row's last real token (found from the attention mask, so left and
right padding both work) and splits it into heads. With `early_exit`, the hook of the deepest
needed layer raises after storing its vectors, so later layers (and the LM head) never run.

    with HeadCapture(layout, positions, layers=[0, 5]) as cap:
        cap.run(model, inputs)
    cap.vectors   # [batch, 2, head, head_dim]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sav_ray.core.model_inputs import collate, encode_row, forward_inputs
from sav_ray.core.models import HeadLayout, LoadedModel, decoder_layers
from sav_ray.core.prompts import Example, PromptConfig
from sav_ray.core.resolution import NO_LIMITS, Preprocessing


class _StopForward(Exception):
    """Raised by the deepest layer's hook to skip the rest of the forward pass."""


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token.  attention_mask [batch, seq] -> [batch]."""
    seq = attention_mask.shape[1]
    flipped = attention_mask.flip(dims=[1]).to(torch.int64)  # [batch, seq]
    return seq - 1 - flipped.argmax(dim=1)


class HeadCapture:
    """Forward pre-hooks on `o_proj` of `layers` (default: all); always removed on exit."""

    def __init__(
        self,
        layout: HeadLayout,
        positions: torch.Tensor,  # [batch] last real token per row
        layers: Sequence[int] | None = None,
        early_exit: bool = False,
    ) -> None:
        self.layout = layout
        self.positions = positions
        self.layers = list(range(layout.num_layers)) if layers is None else sorted(set(layers))
        bad = [i for i in self.layers if not 0 <= i < layout.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {layout.num_layers}")
        self.early_exit = early_exit
        self._captured: dict[int, torch.Tensor] = {}  # layer -> [batch, head, head_dim]
        self._handles: list[Any] = []
        self.forward_seconds = 0.0  # wall time of `run`, queued GPU work included

    def __enter__(self) -> HeadCapture:
        deepest = self.layers[-1]
        for layer in self.layers:
            o_proj = self.layout.o_projs[layer]
            hook = self._make_hook(layer, stop=self.early_exit and layer == deepest)
            self._handles.append(o_proj.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, layer: int, stop: bool):
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]  # [batch, seq, head * head_dim]
            rows = torch.arange(x.shape[0], device=x.device)
            last = x[rows, self.positions.to(x.device)]  # [batch, head * head_dim]
            self._captured[layer] = last.reshape(
                x.shape[0], self.layout.num_heads, self.layout.head_dim
            )  # [batch, head, head_dim]
            if stop:
                raise _StopForward

        return hook

    def run(self, model: torch.nn.Module, inputs: dict[str, Any]) -> None:
        """One forward pass; only the last position's logits are computed when it runs to the end."""
        device = self.positions.device
        started = time.perf_counter()
        with torch.inference_mode():
            try:
                model(**inputs, use_cache=False, logits_to_keep=1)
            except _StopForward:
                pass
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.forward_seconds = time.perf_counter() - started
        missing = [i for i in self.layers if i not in self._captured]
        assert not missing, f"layers {missing} were not reached by the forward pass"

    @property
    def vectors(self) -> torch.Tensor:
        """[batch, layer, head, head_dim] float32 on the CPU, layers in `self.layers` order."""
        return torch.stack(
            [self._captured[i].float().cpu() for i in self.layers], dim=1
        )  # [batch, layer, head, head_dim]


@dataclass
class Captured:
    vectors: np.ndarray  # [batch, layer, head, head_dim] float32
    forward_seconds: float  # time in the model's forward pass


def _capture(
    lm: LoadedModel, inputs: dict[str, Any], layers: Sequence[int] | None, early_exit: bool
) -> tuple[torch.Tensor, float]:
    inputs = {
        k: v.to(lm.input_device) if hasattr(v, "to") else v
        for k, v in forward_inputs(lm.model, inputs).items()
    }
    positions = last_token_positions(inputs["attention_mask"])  # [batch]
    with HeadCapture(lm.layout, positions, layers=layers, early_exit=early_exit) as cap:
        cap.run(lm.model, inputs)
    return cap.vectors, cap.forward_seconds


def capture_inputs(
    lm: LoadedModel,
    inputs: dict[str, Any],
    layers: Sequence[int] | None = None,
    early_exit: bool = False,
) -> torch.Tensor:
    """Vectors of a tokenised batch: [batch, layer, head, head_dim] float32 on the CPU."""
    return _capture(lm, inputs, layers, early_exit)[0]


def capture_rows(
    lm: LoadedModel,
    rows: list[dict[str, torch.Tensor]],
    layers: Sequence[int] | None = None,
    early_exit: bool = False,
) -> Captured:
    """One batched forward pass over rows of `encode_row`: collate, move, run, capture."""
    inputs = collate(rows, lm.processor.tokenizer.pad_token_id)
    vectors, seconds = _capture(lm, inputs, layers, early_exit)
    return Captured(vectors.numpy(), seconds)


def capture_examples(
    lm: LoadedModel,
    examples: list[Example],
    prompt: PromptConfig,
    layers: Sequence[int] | None = None,
    early_exit: bool = False,
    preprocessing: Preprocessing = NO_LIMITS,
) -> np.ndarray:
    """One batched forward pass: [batch, layer, head, head_dim] float32. The same per-row
    processing and collate as the Ray jobs, in this process."""
    rows = [encode_row(lm.processor, ex, prompt, preprocessing) for ex in examples]
    return capture_rows(lm, rows, layers, early_exit).vectors


class LayerCounter:
    """Counts forward calls of each decoder layer with forward pre-hooks, until `remove()`.
    With early exit, layers after the deepest needed one stay at 0. `rows`: the batch rows
    that entered the first layer (a forward call over 3 padded rows counts 3)."""

    def __init__(self, model: torch.nn.Module) -> None:
        layers = decoder_layers(model)
        self.counts = [0] * len(layers)  # [layer]
        self.rows = 0
        self._handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]

    def _hook(self, i: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self.counts[i] += 1
            if i == 0:
                hidden = args[0] if args else kwargs["hidden_states"]  # [batch, seq, hidden]
                self.rows += int(hidden.shape[0])

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
