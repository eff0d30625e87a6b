"""Paper figures: the artists drawn (no lines between categories, no bar for n = 1), the axis
rules, the files written (PDF + PNG at ≥ 200 dpi) and the captions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.collections import LineCollection
from PIL import Image

from transferlab import figures


def point(label, mean, ci, n, **extra):
    return {"label": label, "mean": mean, "ci": ci, "n": n, **extra}


SWEEP = [point("none", 0.912, 0.004, 5), point("l2sp", 0.918, 0.003, 5), point("ewc", 0.915, 0.006, 5),
         point("lwf", 0.921, 0.0, 1)]  # n = 1 with a 0 "interval", as the old report passed it


def data_lines(ax):
    """The Line2D of each series' points (not the error-bar caps, not reference lines)."""
    return [line for line in ax.lines if line.get_gid() == figures.DATA]


def error_bar_xs(ax) -> list[float]:
    """The x position of every vertical error-bar segment drawn."""
    xs = []
    for collection in ax.collections:
        if isinstance(collection, LineCollection):
            xs += [float(segment[0][0]) for segment in collection.get_segments()]
    return xs


def test_categorical_sweep_has_no_connecting_line_and_no_bar_for_n1():
    plot = figures.categorical(SWEEP, "target/test_acc", "regularizer", reference=0.52,
                               reference_label="majority-class baseline")
    ax = plot.figure.axes[0]
    assert len(data_lines(ax)) == 1 and len(data_lines(ax)[0].get_xdata()) == 4
    for line in ax.lines:  # every Line2D (points, error-bar caps): markers only, no segments …
        if line.get_gid() == figures.REFERENCE:  # … except the baseline, which is horizontal
            assert len(set(np.asarray(line.get_ydata(), dtype=float))) == 1
        else:
            assert line.get_linestyle() == "None", line
    assert sorted(error_bar_xs(ax)) == [0.0, 1.0, 2.0]  # lwf (x = 3, n = 1) has no bar
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[3] == "lwf\nn=1" and ticks[0] == "none\nn=5"
    assert ax.get_ylabel() == "target test accuracy" and ax.get_xlabel() == "regularizer"
    assert "n = 1–5 seeds; settings with n = 1 have no interval" in plot.caption
    assert "dashed: majority-class baseline" in plot.caption


def test_categorical_groups_sit_side_by_side_without_lines():
    points = [point(reg, 0.8, 0.01, 3, group=freeze) for freeze in ("full", "partial") for reg in ("none", "l2sp")]
    ax = figures.categorical(points, "target/test_f1", "regularizer").figure.axes[0]
    lines = data_lines(ax)
    assert len(lines) == 2 and all(line.get_linestyle() == "None" for line in lines)
    assert list(lines[0].get_xdata()) == pytest.approx([-0.15, 0.85])  # dodged around 0 and 1
    assert list(lines[1].get_xdata()) == pytest.approx([0.15, 1.15])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full", "partial"]


def test_numeric_sweep_is_lines_sorted_by_value():
    series = {"regularizer=none": [{"x": x, "mean": m, "ci": 0.01, "n": 5} for x, m in [(1e-2, 0.8), (1e-4, 0.7), (1e-3, 0.85)]],
              "regularizer=l2sp": [{"x": x, "mean": 0.8, "ci": math.nan, "n": 1} for x in (1e-4, 1e-3, 1e-2)]}
    plot = figures.numeric(series, "target/test_acc", "target.lr")
    ax = plot.figure.axes[0]
    first, second = data_lines(ax)
    assert list(first.get_xdata()) == [1e-4, 1e-3, 1e-2] and list(first.get_ydata()) == [0.7, 0.85, 0.8]
    assert first.get_linestyle() == "-"
    assert ax.get_xscale() == "log"  # 1e-4 … 1e-2 spans 100×
    assert sorted(error_bar_xs(ax)) == pytest.approx([1e-4, 1e-3, 1e-2])  # the n = 1 series has none
    assert [t.get_text() for t in ax.texts] == ["n=1"] * 3
    assert ax.get_xlabel() == "target learning rate (log scale)"


def test_files_pdf_and_png_at_high_dpi(tmp_path):
    plot = figures.categorical(SWEEP, "target/test_acc", "regularizer", save_to=tmp_path / "plots" / "acc_by_reg")
    pdf, png = plot.files
    assert pdf.read_bytes().startswith(b"%PDF") and png.read_bytes().startswith(b"\x89PNG")
    with Image.open(png) as image:
        assert min(image.info["dpi"]) >= 200
        width_in = plot.figure.get_size_inches()[0]
        assert image.size[0] >= 0.8 * width_in * 200  # pixels really are there (bbox-tight crops a little)
    assert plot.markdown(tmp_path) == f"![{plot.caption}](plots/acc_by_reg.png)\n\n*{plot.caption}*"


def test_honest_axes_for_accuracy_differences_and_counts():
    # a 0.006 difference between 0.912 and 0.918: the axis still spans ≥ 0.1
    low, high = figures.y_limits("target/test_acc", [0.909, 0.915], [0.915, 0.921])
    assert high - low >= figures.MIN_SPAN and 0 <= low < 0.909 and 0.921 < high <= 1
    # near the top of [0, 1], the window slides down rather than running past 1
    low, high = figures.y_limits("target/test_acc", [0.985], [0.999])
    assert high == 1.0 and high - low >= figures.MIN_SPAN
    # differences include 0
    low, high = figures.y_limits("transfer/gain", [0.05], [0.07])
    assert low < 0 < high and high - low >= figures.MIN_SPAN
    # counts and times start at 0; free scores autoscale
    assert figures.y_limits("time/target_fit_s", [40.0], [60.0])[0] == 0.0
    assert figures.y_limits("transferability/logme", [-0.6], [-0.5]) is None
    ax = figures.categorical(SWEEP, "target/test_acc").figure.axes[0]
    assert ax.get_ylim()[1] - ax.get_ylim()[0] >= figures.MIN_SPAN


def test_axis_labels_map_and_fallback():
    assert figures.axis_label("target/test_acc") == "target test accuracy"
    assert figures.axis_label("transfer/forgetting") == "forgetting (source accuracy lost, or perplexity gained)"
    assert figures.axis_label("target/test_f1") == "target test entity F1"
    assert figures.axis_label("target/val_loss") == "target validation loss"
    assert figures.axis_label("regularizer.alpha") == "regularizer alpha"
    assert figures.axis_label("efficiency/throughput_s") == "efficiency throughput (s)"


def test_scatter_labels_points_and_uses_log_x_for_parameter_counts():
    points = [{"label": name, "x": x, "y": y, "yerr": 0.01, "n": 5}
              for name, x, y in [("full", 2.2e7, 0.86), ("lora", 3e5, 0.84), ("linear probe", 4e3, 0.74)]]
    plot = figures.scatter(points, "params/trainable", "target/test_acc", note="Kendall τ = 1.00")
    ax = plot.figure.axes[0]
    assert ax.get_xscale() == "log"
    assert {t.get_text() for t in ax.texts} == {"full", "lora", "linear probe", "Kendall τ = 1.00"}
    assert all(line.get_linestyle() == "None" for line in ax.lines)  # settings are not a series
    assert "Kendall τ = 1.00" in plot.caption and plot.caption.startswith("Target test accuracy against trainable")
    linear = figures.scatter(points, "transferability/logme", "target/test_acc").figure.axes[0]
    assert linear.get_xscale() == "linear"


def test_a_log_axis_under_two_decades_is_labelled_in_plain_numbers_without_minor_labels():
    """Fit times of 20-600 s: matplotlib alone labels every minor tick (2×10¹, 3×10¹, …), which
    run together; the axis reads 20, 50, 100, 200, 500."""
    points = [{"label": name, "x": x, "y": 0.6, "n": 3} for name, x in [("a", 21.6), ("b", 64.4), ("c", 504.6)]]
    fig = figures.scatter(points, "time/target_fit_s", "target/test_acc").figure
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_xscale() == "log"
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
    assert shown == ["20", "50", "100", "200", "500"]
    assert not any(t.get_text() for t in ax.get_xticklabels(minor=True))


def test_wise_ft_curve():
    alphas = [0.0, 0.5, 1.0]
    curve = lambda values: [{"mean": v, "ci": 0.01, "n": 3} for v in values]  # noqa: E731
    plot = figures.wise_ft(alphas, {"target/test_acc": curve([0.5, 0.8, 0.85]),
                                    "target/ood_test_acc": curve([0.45, 0.7, 0.6]),
                                    "source/test_acc_after": curve([0.95, 0.8, 0.5])})
    ax = plot.figure.axes[0]
    lines = data_lines(ax)
    assert len(lines) == 3 and all(list(line.get_xdata()) == alphas for line in lines)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "ID (target test accuracy)", "OOD (target OOD test accuracy)", "source (source test accuracy)"]
    assert ax.get_xlim() == pytest.approx((-0.03, 1.03))
    assert plot.caption.startswith("WiSE-FT") and "n = 3 seeds" in plot.caption


def test_scatter_labels_drop_the_key_every_setting_shares():
    from transferlab.figures import without_common_key

    assert without_common_key(["+ablation/baselines=none", "+ablation/baselines=lwf"]) == ["none", "lwf"]
    assert without_common_key(["regularizer=l2sp", "freeze=lp_ft"]) == ["regularizer=l2sp", "freeze=lp_ft"]
    two_keys = ["source=pretrained data.size=100", "source=pretrained data.size=500"]
    assert without_common_key(two_keys) == two_keys
    assert without_common_key(["full"]) == ["full"]


def test_scatter_labels_of_close_points_do_not_overlap():
    """The baselines ablation's trade-off plot: none / bss, lp_ft / ewc and l2sp / delta lie close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    arms = {"none": (0.468, 0.9428), "bss": (0.489, 0.9427), "lp_ft": (0.403, 0.9374), "ewc": (0.431, 0.938),
            "l2sp": (0.354, 0.9166), "delta": (0.385, 0.9162), "lwf": (0.263, 0.9354), "co_tuning": (0.654, 0.9369)}
    points = [{"label": f"+ablation/baselines={name}", "x": x, "y": y, "xerr": 0.1, "yerr": 0.01, "n": 5}
              for name, (x, y) in arms.items()]
    fig = figures.scatter(points, "transfer/forgetting", "target/test_acc").figure
    ax = fig.axes[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    boxes = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
    assert set(boxes) == set(arms)
    names = sorted(boxes)
    clashes = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if boxes[a].overlaps(boxes[b])]
    assert clashes == []
    frame = ax.get_window_extent(renderer)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 for b in boxes.values())
