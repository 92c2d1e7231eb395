"""The figures logged to MLflow: head heat map, k curve, confusion matrix, reliability diagram.

Each builder returns a matplotlib `Figure` (no pyplot: no global state, renders with Agg) laid
out with constrained layout, so that `fig.savefig(path)` (what `mlflow.log_figure` calls, without
bbox_inches="tight") keeps every title, label, tick label and legend inside the image:
- the figure size grows with the grid (layers x heads, classes x classes) within fixed bounds,
- titles are short, with a smaller subtitle wrapped to the figure's width,
- legends sit below the axes, never over the data,
- big grids get thinned tick labels; a big confusion matrix drops its per-cell counts.

    mlflow.log_figure(head_heatmap(artifact.head_scores, artifact.heads), "head_scores.png")
"""

from __future__ import annotations

import math
import textwrap
from typing import TYPE_CHECKING, Any

import numpy as np

from sav_ray.core import calibration

if TYPE_CHECKING:
    from sav_ray.pipelines.evaluation import Metrics

MIN_TICK_SPACING_IN = 0.28  # between neighbouring tick labels of a grid, in inches
MAX_GRID_IN = 10.0  # the longest side of a heat map or confusion matrix grid, in inches
MAX_FIGURE_IN = 16.0
SELECTED_COLOUR = "red"
_TICK_STEPS = (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 200, 256, 500, 1000)
_CHAR_WIDTH_EM = 0.62  # a generous mean character width of the default font, in ems
_LABEL_CHARS = 20  # class names longer than this are shortened on the axes


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    size = (min(MAX_FIGURE_IN, width), min(MAX_FIGURE_IN, height))
    fig = Figure(figsize=size, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.06, h_pad=0.06)  # inches kept free at the edges
    return fig


def _wrap(text: str, width_in: float, fontsize_pt: float) -> str:
    """`text` in lines that fit `width_in` inches at `fontsize_pt` points."""
    chars = max(12, int(width_in * 72 / (fontsize_pt * _CHAR_WIDTH_EM)))
    return "\n".join(textwrap.wrap(text, chars)) or text


def _titles(fig: Any, ax: Any, title: str, subtitle: str, width_in: float) -> None:
    """A short title over the figure and a smaller wrapped subtitle over the axes."""
    fig.suptitle(_wrap(title, width_in, 12), fontsize=12)
    ax.set_title(_wrap(subtitle, width_in, 9), fontsize=9)


def _tick_step(cell_in: float, spacing_in: float = MIN_TICK_SPACING_IN) -> int:
    """Label every `step`-th cell so that labels stand at least `spacing_in` apart."""
    for step in _TICK_STEPS:
        if step * cell_in >= spacing_in:
            return step
    return math.ceil(spacing_in / cell_in)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _shorten(label: str, chars: int = _LABEL_CHARS) -> str:
    return label if len(label) <= chars else label[: chars - 1] + "\u2026"


def head_heatmap(scores: np.ndarray, heads: np.ndarray) -> Any:
    """A matplotlib Figure of every head's score, layers x heads, the selected heads boxed."""
    from matplotlib.patches import Patch, Rectangle

    scores = np.asarray(scores, dtype=np.float64)  # [layer, head]
    heads = np.asarray(heads).reshape(-1, 2)  # [k, 2] (layer, head)
    num_layers, num_heads = scores.shape
    cell = min(0.5, MAX_GRID_IN / max(num_layers, num_heads))  # inches: the grid fits the figure
    width = max(6.5, cell * num_heads + 2.8)  # y labels, colorbar
    height = max(4.8, cell * num_layers + 2.8)  # titles, x labels, legend
    fig = _figure(width, height)
    ax = fig.subplots()
    image = ax.imshow(
        scores, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1,
        interpolation="nearest",
    )  # fmt: skip
    cell_x = (width - 2.8) / num_heads  # a cell's width and height once laid out, about
    cell_y = (height - 2.8) / num_layers
    line = float(np.clip(min(cell_x, cell_y) * 4, 1.2, 2.0))
    for layer, head in heads:  # a box inside the cell, so neighbouring boxes stay apart
        ax.add_patch(
            Rectangle(
                (head - 0.44, layer - 0.44), 0.88, 0.88,
                facecolor="none", edgecolor=SELECTED_COLOUR, linewidth=line,
            )
        )  # fmt: skip
    labelsize = 9 if cell >= 0.3 else 8
    step_x, step_y = _tick_step(cell_x), _tick_step(cell_y, 0.22)
    ax.set_xticks(range(0, num_heads, step_x))
    ax.set_yticks(range(0, num_layers, step_y))
    ax.tick_params(labelsize=labelsize)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    _titles(
        fig,
        ax,
        f"Head scores: {len(heads)} of {num_layers * num_heads} heads selected",
        f"{_count(num_layers, 'layer')} x {_count(num_heads, 'head')}; score = share of "
        "training examples nearest to their own class at that head",
        fig.get_figwidth() - 0.5,
    )
    colorbar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    colorbar.set_label("score")
    colorbar.ax.tick_params(labelsize=labelsize)
    fig.legend(
        handles=[
            Patch(
                facecolor="none", edgecolor=SELECTED_COLOUR, linewidth=1.5,
                label=f"selected head (k = {len(heads)})",
            )
        ],
        loc="outside lower center", fontsize="small", frameon=False,
    )  # fmt: skip
    return fig


def k_curve_figure(curve: Any, chosen: int) -> Any:
    """Leave-one-out vote accuracy and log loss against k (log scale), the chosen k marked."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    loss, _ = curve.best_log_loss()
    fig = _figure(7.5, 5.0)
    ax = fig.subplots()
    ax.plot(curve.ks, curve.accuracy(), "o-", color="tab:blue", label="leave-one-out accuracy")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 1, 10, 100 rather than 10^0, ...
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels would crowd the axis
    ax.set_xlabel("k (heads voting, log scale)")
    ax.set_ylabel("accuracy", color="tab:blue")
    ax.axvline(chosen, color="grey", linestyle="--", label=f"chosen k = {chosen}")
    other = ax.twinx()
    other.plot(curve.ks, loss, "s-", color="tab:orange", label="log loss")
    other.set_ylabel("log loss (at the best temperature)", color="tab:orange")
    _titles(
        fig,
        ax,
        f"Choosing k: k = {chosen}",
        f"leave-one-out on the {_count(curve.n, 'training example')}, {len(curve.ks)} candidate k",
        fig.get_figwidth() - 0.5,
    )
    lines, names = ax.get_legend_handles_labels()
    more_lines, more_names = other.get_legend_handles_labels()
    fig.legend(
        lines + more_lines, names + more_names, loc="outside lower center", ncols=3,
        fontsize="small", frameon=False,
    )  # fmt: skip
    return fig


def confusion_figure(m: Metrics, title: str) -> Any:
    """A matplotlib Figure of the confusion matrix (rows: true label, columns: predicted)."""
    confusion = np.asarray(m.confusion)  # [true, predicted]
    c = len(m.labels)
    cell = min(0.9, MAX_GRID_IN / max(c, 1))  # inches: the grid fits the figure
    step = _tick_step(cell, 0.2)
    labels = [_shorten(str(label)) for label in m.labels]
    longest = max((len(label) for label in labels), default=1)
    fontsize = 9 if cell >= 0.3 else 8
    label_in = longest * fontsize * _CHAR_WIDTH_EM / 72  # the longest tick label, in inches
    width = max(5.5, cell * c + label_in + 2.2)  # y labels, colorbar
    height = max(4.8, cell * c + label_in + 1.8)  # titles, x labels
    fig = _figure(width, height)
    ax = fig.subplots()
    image = ax.imshow(confusion, cmap="Blues", aspect="auto", interpolation="nearest")
    shown = range(0, c, step)
    flat = label_in <= 0.85 * step * cell  # x labels fit side by side
    ax.set_xticks(shown, [labels[i] for i in shown], rotation=0 if flat else 90)
    ax.set_yticks(shown, [labels[i] for i in shown])
    ax.tick_params(labelsize=fontsize)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    digits = len(str(int(confusion.max()))) if confusion.size else 1
    number_pt = min(10.0, 0.8 * cell * 72 / (digits * _CHAR_WIDTH_EM))  # fits its cell
    counted = int(confusion.sum())
    notes = [f"{_count(m.rows, 'evaluation row')}; grid rows: true label, columns: predicted"]
    if counted < m.rows:
        notes.append(f"{m.rows - counted} answers naming no label left out")
    if step > 1:
        notes.append(f"1 label in {step} shown")
    if c <= 40 and number_pt >= 6:
        threshold = confusion.max() / 2
        for i in range(c):
            for j in range(c):
                value = int(confusion[i, j])
                colour = "white" if value > threshold else "black"
                ax.text(
                    j, i, str(value), ha="center", va="center", color=colour, fontsize=number_pt
                )
    else:
        notes.append("counts by colour only")
    _titles(
        fig, ax, f"{title}: accuracy {m.accuracy:.3f}", "; ".join(notes), fig.get_figwidth() - 0.5
    )
    colorbar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    colorbar.set_label("rows (count)")
    colorbar.ax.tick_params(labelsize=fontsize)
    return fig


def reliability_figure(records: list[dict[str, Any]], labels: list[str], bins: int = 10) -> Any:
    """Reliability diagram: accuracy against confidence in equal bins, for the vote shares and
    (where the SAV has them) the probabilities; the diagonal is perfect calibration."""
    from sav_ray.pipelines.evaluation import sav_probabilities  # imports torch: when used

    index = {label: i for i, label in enumerate(labels)}
    true_idx = np.array([index[str(r["true_label"])] for r in records])
    curves = {
        "vote share": (
            np.array([float(r["sav_confidence"]) for r in records]),
            np.array([int(r["sav"]) for r in records]) == true_idx,
        )
    }
    probs = sav_probabilities(records)
    if probs is not None:
        curves["probability"] = (probs.max(axis=1), probs.argmax(axis=1) == true_idx)
    fig = _figure(6.5, 7.0)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    for (name, (confidence, correct)), marker in zip(curves.items(), "os", strict=False):
        points = calibration.reliability_bins(confidence, correct, bins)
        xs, ys = [x for _, x, _ in points], [y for _, _, y in points]
        ece = calibration.expected_calibration_error(confidence, correct, bins)
        ax.plot(xs, ys, f"{marker}-", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence (top vote share or top probability)")
    ax.set_ylabel("accuracy")
    _titles(
        fig,
        ax,
        "SAV reliability",
        f"{_count(len(records), 'evaluation row')}, {bins} equal confidence bins",
        fig.get_figwidth() - 0.5,
    )
    fig.legend(loc="outside lower center", ncols=len(curves) + 1, fontsize="small", frameon=False)
    return fig
