"""The figures logged to MLflow are readable whole (sav_ray.tracking.plots).

Each figure is drawn with the Agg canvas, as `fig.savefig(path)` (what `mlflow.log_figure` calls)
draws it, at small and big grids; then every drawn text (titles, axis labels, tick labels,
legend entries, colorbar labels) must lie inside the figure, no two of them may overlap, legends
must stay off the axes, and the selected heads must be boxed.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import numpy as np
import pytest
from matplotlib.axis import Tick
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from sav_ray.core.calibration import LooCurve
from sav_ray.pipelines.evaluation import compute_metrics
from sav_ray.tracking.plots import (
    confusion_figure,
    head_heatmap,
    k_curve_figure,
    reliability_figure,
)

TOLERANCE_PX = 1.0
HEAT_MAP_GRIDS = [(1, 2), (4, 8), (28, 28), (80, 64)]  # layers x heads
CLASS_COUNTS = [2, 30, 100]


# ---- what was drawn ------------------------------------------------------------------------


def render(fig: Any) -> Any:
    """Draw `fig` with Agg (constrained layout runs here, as in savefig); fail on its warnings."""
    canvas = FigureCanvasAgg(fig)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "constrained_layout not applied": no room left
        canvas.draw()
    return canvas.get_renderer()


def drawn_tick_labels(axis: Any) -> list[Text]:
    """The tick labels `axis` draws: ticks inside the view interval, with text."""
    if not axis.get_visible() or not axis.axes.get_visible() or not axis.axes.axison:
        return []
    lo, hi = sorted(axis.get_view_interval())
    slack = 1e-9 * max(1.0, abs(lo), abs(hi))
    ticks = axis.get_major_ticks(len(axis.get_majorticklocs())) + axis.get_minor_ticks(
        len(axis.get_minorticklocs())
    )
    return [
        label
        for tick in ticks
        if tick.get_visible() and lo - slack <= tick.get_loc() <= hi + slack
        for label in (tick.label1, tick.label2)
        if label.get_visible() and label.get_text().strip()
    ]


def axes_of(fig: Any) -> list[tuple[Any, Any]]:
    return [(ax, axis) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)]


def other_texts(fig: Any) -> list[Text]:
    """Every drawn text that is not a tick label: titles, axis labels, legends, annotations."""
    skip: set[int] = set()
    for ax, axis in axes_of(fig):
        for child in axis.get_children():
            if isinstance(child, Tick):
                skip |= {id(child.label1), id(child.label2)}
        if not axis.get_visible() or not ax.get_visible() or not ax.axison:
            skip |= {id(axis.label), id(axis.offsetText)}
    return [
        t
        for t in fig.findobj(Text)
        if id(t) not in skip and t.get_visible() and t.get_text().strip()
    ]


def all_texts(fig: Any) -> list[Text]:
    ticks = [t for _, axis in axes_of(fig) for t in drawn_tick_labels(axis)]
    return ticks + other_texts(fig)


def overlap(a: Any, b: Any, slack: float = TOLERANCE_PX) -> bool:
    """Whether two display bboxes share more than `slack` pixels both ways."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width > slack and height > slack


# ---- the checks ----------------------------------------------------------------------------


def assert_texts_inside(fig: Any, renderer: Any) -> None:
    width, height = fig.bbox.width, fig.bbox.height
    outside = []
    for t in all_texts(fig):
        box = t.get_window_extent(renderer)
        if (
            box.x0 < -TOLERANCE_PX
            or box.y0 < -TOLERANCE_PX
            or box.x1 > width + TOLERANCE_PX
            or box.y1 > height + TOLERANCE_PX
        ):
            outside.append((t.get_text(), tuple(np.round(box.extents))))
    assert outside == [], f"texts cut off by the figure's edge ({width:.0f}x{height:.0f})"


def assert_tick_labels_apart(fig: Any, renderer: Any) -> None:
    for _, axis in axes_of(fig):
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in drawn_tick_labels(axis)]
        clashes = [
            (a, b)
            for i, (a, box_a) in enumerate(boxes)
            for b, box_b in boxes[i + 1 :]
            if overlap(box_a, box_b)
        ]
        assert clashes == [], f"{axis.axis_name} tick labels overlap: {clashes[:5]}"


def assert_texts_apart(fig: Any, renderer: Any) -> None:
    """No two texts outside the data (titles, labels, tick labels, legend) overlap."""
    cell_texts = {id(t) for ax in fig.axes for t in ax.texts}  # a confusion matrix's counts
    boxes = [
        (t.get_text(), t.get_window_extent(renderer))
        for t in all_texts(fig)
        if id(t) not in cell_texts
    ]
    clashes = [
        (a, b)
        for i, (a, box_a) in enumerate(boxes)
        for b, box_b in boxes[i + 1 :]
        if overlap(box_a, box_b)
    ]
    assert clashes == [], f"texts overlap: {clashes[:5]}"


def assert_legends_off_the_axes(fig: Any, renderer: Any) -> None:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends, "the figure has no legend"
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not overlap(box, ax.get_window_extent(renderer)), (
                f"legend {[t.get_text() for t in legend.get_texts()]} covers axes {ax.get_label()}"
            )


def assert_readable(fig: Any, legend: bool = True) -> Any:
    renderer = render(fig)
    assert_texts_inside(fig, renderer)
    assert_tick_labels_apart(fig, renderer)
    assert_texts_apart(fig, renderer)
    if legend:
        assert_legends_off_the_axes(fig, renderer)
    assert fig.get_suptitle() or fig.axes[0].get_title(), "the figure has no title"
    return renderer


# ---- data ----------------------------------------------------------------------------------


def heat_map_data(layers: int, heads: int, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(layers * 1000 + heads)
    scores = rng.uniform(0, 1, (layers, heads))  # [layer, head]
    k = k or max(1, min(20, layers * heads // 2))
    best = np.argsort(-scores.ravel(), kind="stable")[:k]
    return scores, np.stack(np.unravel_index(best, scores.shape), axis=1)  # [k, 2]


def metrics(classes: int) -> Any:
    rng = np.random.default_rng(classes)
    labels = [
        f"class {i}" if i % 3 else f"a rather long class name number {i}" for i in range(classes)
    ]
    true = rng.integers(0, classes, 40 * classes)
    pred = np.where(rng.uniform(size=true.size) < 0.7, true, rng.integers(0, classes, true.size))
    pred[:5] = -1  # zero-shot answers naming no label
    return compute_metrics(labels, true, pred, None)


def records(rows: int = 200, probabilities: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    rng = np.random.default_rng(rows)
    labels = ["cat", "dog", "bird"]
    out = []
    for _ in range(rows):
        p = rng.dirichlet([2.0, 1.0, 1.0])
        votes = rng.dirichlet([3.0, 1.0, 1.0])
        row = {
            "true_label": labels[int(rng.integers(0, 3))],
            "sav": int(votes.argmax()),
            "sav_confidence": float(votes.max()),
        }
        if probabilities:
            row["sav_probabilities"] = json.dumps(p.tolist())
        out.append(row)
    return out, labels


def k_curve(candidates: int = 11) -> LooCurve:
    rng = np.random.default_rng(candidates)
    ks = np.unique(np.geomspace(1, 784, candidates).astype(int))
    return LooCurve(
        ks=ks,
        temperatures=np.array([0.5, 1.0, 2.0]),
        correct=rng.integers(40, 100, len(ks)),
        log_loss=rng.uniform(20, 80, (len(ks), 3)),
        n=100,
    )


# ---- head heat map -------------------------------------------------------------------------


@pytest.mark.parametrize("layers,heads", HEAT_MAP_GRIDS + [(200, 2)], ids=lambda v: str(v))
def test_head_heatmap_is_readable_whole(layers: int, heads: int) -> None:
    scores, selected = heat_map_data(layers, heads)
    fig = head_heatmap(scores, selected)
    assert_readable(fig)
    ax, colorbar = fig.axes
    assert len(drawn_tick_labels(ax.xaxis)) >= min(heads, 4)  # thinned, not gone
    assert len(drawn_tick_labels(ax.yaxis)) >= min(layers, 4)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("head", "layer")
    assert colorbar.get_ylabel() == "score"


@pytest.mark.parametrize("layers,heads", HEAT_MAP_GRIDS, ids=lambda v: str(v))
def test_head_heatmap_boxes_exactly_the_selected_heads(layers: int, heads: int) -> None:
    scores, selected = heat_map_data(layers, heads)
    fig = head_heatmap(scores, selected)
    render(fig)
    ax = fig.axes[0]
    boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(boxes) == len(selected)
    centres = {
        (round(b.get_y() + b.get_height() / 2), round(b.get_x() + b.get_width() / 2)) for b in boxes
    }
    assert centres == {(int(layer), int(head)) for layer, head in selected}
    legend_texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert any(f"k = {len(selected)}" in t for t in legend_texts), legend_texts


def test_head_heatmap_title_is_not_cut_off() -> None:
    """The old heat map (tight_layout, one long axes title) lost both ends of its title at
    4 x 8 heads: "ad scores (training examples nearest ..."."""
    scores, selected = heat_map_data(4, 8)
    fig = head_heatmap(scores, selected)
    renderer = render(fig)
    titles = [t for t in (fig._suptitle, fig.axes[0].title) if t is not None and t.get_text()]
    assert titles
    for title in titles:
        box = title.get_window_extent(renderer)
        assert box.x0 >= -TOLERANCE_PX and box.x1 <= fig.bbox.width + TOLERANCE_PX, title


def test_head_heatmap_thins_its_ticks_on_a_big_grid() -> None:
    scores, selected = heat_map_data(80, 64)
    fig = head_heatmap(scores, selected)
    render(fig)
    ax = fig.axes[0]
    assert len(drawn_tick_labels(ax.xaxis)) < 64
    assert len(drawn_tick_labels(ax.yaxis)) < 80


def test_head_heatmap_size_follows_the_grid_within_bounds() -> None:
    size = {grid: head_heatmap(*heat_map_data(*grid)).get_size_inches() for grid in
            HEAT_MAP_GRIDS + [(200, 2)]}  # fmt: skip
    assert all(4 <= w <= 16 and 4 <= h <= 16 for w, h in size.values()), size
    assert max(size[(1, 2)]) <= 8 and max(size[(4, 8)]) <= 8  # small grids stay small
    assert min(size[(28, 28)]) >= 10 and min(size[(80, 64)]) >= 10  # big ones get room
    assert size[(80, 64)][1] > size[(80, 64)][0]  # more layers than heads: taller than wide
    assert size[(200, 2)][1] > 1.5 * size[(200, 2)][0]


# ---- k curve -------------------------------------------------------------------------------


@pytest.mark.parametrize("candidates", [2, 11, 40])
def test_k_curve_is_readable_whole(candidates: int) -> None:
    curve = k_curve(candidates)
    chosen = int(curve.ks[curve.choose()])
    fig = k_curve_figure(curve, chosen)
    assert_readable(fig)
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and fig.axes[1].get_ylabel()
    names = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert f"chosen k = {chosen}" in names


# ---- confusion matrix ----------------------------------------------------------------------


@pytest.mark.parametrize("classes", CLASS_COUNTS)
def test_confusion_matrix_is_readable_whole(classes: int) -> None:
    m = metrics(classes)
    fig = confusion_figure(m, "all_heads")
    renderer = assert_readable(fig, legend=False)
    ax, colorbar = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted label", "true label")
    assert colorbar.get_ylabel()
    cell_width = ax.get_window_extent(renderer).width / classes
    cell_height = ax.get_window_extent(renderer).height / classes
    for count in ax.texts:  # each count fits its cell
        box = count.get_window_extent(renderer)
        assert box.width < cell_width and box.height < cell_height, count.get_text()


def test_confusion_matrix_counts_show_on_small_grids_only() -> None:
    for classes in (2, 30):
        fig = confusion_figure(metrics(classes), "sav")
        assert len(fig.axes[0].texts) == classes * classes
    assert len(confusion_figure(metrics(100), "sav").axes[0].texts) == 0


def test_confusion_matrix_thins_its_tick_labels_on_many_classes() -> None:
    fig = confusion_figure(metrics(100), "sav")
    render(fig)
    ax = fig.axes[0]
    assert 0 < len(drawn_tick_labels(ax.xaxis)) < 100
    assert 0 < len(drawn_tick_labels(ax.yaxis)) < 100
    fig = confusion_figure(metrics(30), "sav")
    render(fig)
    assert len(drawn_tick_labels(fig.axes[0].xaxis)) == 30


# ---- reliability diagram -------------------------------------------------------------------


@pytest.mark.parametrize("probabilities", [True, False])
def test_reliability_diagram_is_readable_whole(probabilities: bool) -> None:
    rows, labels = records(probabilities=probabilities)
    fig = reliability_figure(rows, labels)
    assert_readable(fig)
    names = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert len(names) == (3 if probabilities else 2)
    assert any(name.startswith("vote share (ECE") for name in names)


# ---- as MLflow saves them ------------------------------------------------------------------


def test_savefig_without_tight_bbox_keeps_the_figure_size() -> None:
    """mlflow.log_figure calls fig.savefig(path): the PNG is the whole figure, laid out."""
    from PIL import Image

    fig = head_heatmap(*heat_map_data(4, 8))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    width, height = Image.open(io.BytesIO(buffer.getvalue())).size
    w_in, h_in = fig.get_size_inches()
    assert (width, height) == (round(w_in * fig.dpi), round(h_in * fig.dpi))
    # the positions savefig's layout left, measured without drawing (and laying out) again
    assert_texts_inside(fig, FigureCanvasAgg(fig).get_renderer())


def test_log_evaluation_logs_a_confusion_matrix_per_method(mlflow_store, tmp_path) -> None:
    """The caller in the tracking layer logs figures of this module, whole, into a real run."""
    from mlflow import MlflowClient
    from PIL import Image

    from sav_ray.tracking import runs

    rows, labels = records()
    with runs.run("plots", mlflow_store, "log-evaluation") as active:
        runs.log_evaluation(
            {"sav": metrics(2), "all_heads": metrics(30)},
            reliability=reliability_figure(rows, labels),
        )
    client = MlflowClient(mlflow_store)
    run_id = active.info.run_id
    names = {f.path for f in client.list_artifacts(run_id)}
    assert {"confusion_sav.png", "confusion_all_heads.png", "reliability.png"} <= names
    fig = confusion_figure(metrics(30), "all_heads")  # what log_evaluation logged
    png = client.download_artifacts(run_id, "confusion_all_heads.png", str(tmp_path))
    width, height = fig.get_size_inches() * fig.dpi
    assert Image.open(png).size == (round(width), round(height))  # saved whole, not cropped
    assert_readable(fig, legend=False)
    assert runs.head_heatmap is head_heatmap and runs.k_curve_figure is k_curve_figure
