"""Figures a paper can print: one style, readable axis names, honest axes, PDF + PNG.

Each builder takes summaries the report already has — a point is a dict with "label", "mean",
"ci" (the 95% half-width, NaN when there is none) and "n", as `stats.mean_ci` returns plus a
label — draws one figure, saves it when `save_to` (a path without suffix) is given, and returns a
`Plot`: the figure (tests inspect its artists), the caption line for report.md, and the files.

Rules every builder follows:
- Categorical settings (regularizer=l2sp, freeze=lora, ...) are points with error bars and no line
  between them: a line would claim an order and an interpolation that do not exist. Numeric
  hyper-parameters (lr, label budget, α) are lines, sorted by value.
- n = 1: no error bar (there is no interval), and the tick label or an annotation says n=1.
- Honest y-axes, decided by what the metric is (`metric_kind`):
  accuracy-like metrics (acc, F1: values in [0, 1]) span at least MIN_SPAN = 0.1 (10 points) inside
  [0, 1], centred on the data — a 0.006 difference fills 6% of the axis, not all of it, while a
  real 2-point effect is still visible (a full [0, 1] axis would hide it);
  differences (gain, forgetting) also span ≥ 0.1 and always include 0, drawn as a reference line;
  counts, times, memory and throughput start at 0; other scores (LogME, ...) are left to autoscale.
- Axis names come from LABELS, else `axis_label` prettifies the key ("target/ood_test_acc" →
  "target OOD test accuracy").
- One style (STYLE, an rcParams context: small sans-serif fonts, no top/right spines, a
  colour-blind-safe palette, TrueType fonts embedded in the PDF), PDF (vector) + PNG at DPI (220; `--dpi` for more).

Figures are built on `matplotlib.figure.Figure` and saved through the Agg (PNG) and PDF backends,
never pyplot: no global figure state, nothing to close, safe in a Hydra callback.
"""

from __future__ import annotations

import logging
import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib as mpl
import numpy as np
from cycler import cycler
from matplotlib.figure import Figure

DPI = 220  # (PNG metadata stores 200 as 199.9996) report.md and screens; `transferlab report --dpi 300` for print (PNG cost grows with dpi²)
# Embedding fonts in a PDF logs every subsetting step at INFO (fontTools): noise in a sweep's log.
logging.getLogger("fontTools").setLevel(logging.WARNING)
MIN_SPAN = 0.1  # the smallest y-range of an accuracy-like or difference axis (accuracy units)
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = "osD^vP*Xh<>p"
REFERENCE = "reference"  # gid of horizontal reference lines (0, a baseline): not data
DATA = "data"  # gid of the Line2D holding a series' points (error-bar caps are Line2Ds too)

STYLE = {
    "figure.figsize": (4.8, 3.3),
    "font.size": 9, "axes.labelsize": 9, "axes.titlesize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8,
    "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "axes.grid.axis": "y", "grid.alpha": 0.3, "grid.linewidth": 0.6,
    "axes.prop_cycle": cycler(color=OKABE_ITO),
    "lines.linewidth": 1.4, "lines.markersize": 5, "errorbar.capsize": 3,
    "legend.frameon": False,
    "pdf.fonttype": 42, "ps.fonttype": 42,  # embed TrueType: journals reject Type 3 fonts
    "savefig.bbox": "tight", "savefig.pad_inches": 0.03,
}

LABELS = {
    "target/test_acc": "target test accuracy",
    "target/val_acc": "target validation accuracy",
    "target/test_f1": "target test entity F1",
    "target/val_f1": "target validation entity F1",
    "target/ood_test_acc": "target OOD test accuracy",
    "target/ood_test_f1": "target OOD test entity F1",
    "target/test_ppl": "target test perplexity (lower is better)",
    "target/val_ppl": "target validation perplexity (lower is better)",
    "source/test_ppl_before": "source perplexity before transfer",
    "source/test_ppl_after": "source perplexity after transfer",
    "source/test_acc_before": "source test accuracy before transfer",
    "source/test_acc_after": "source test accuracy after transfer",
    "transfer/forgetting": "forgetting (source accuracy lost, or perplexity gained)",
    "transfer/forgetting_relative": "forgetting (relative to the source score before)",
    "transfer/gain": "transfer gain (vs scratch)",
    "efficiency/samples_per_s": "training throughput (samples/s)",
    "efficiency/peak_mem_mb": "peak memory (MB)",
    "time/source_s": "source stage time (s)",
    "time/target_fit_s": "target fine-tuning time (s)",
    "params/trainable": "trainable parameters",
    "params/total": "total parameters",
    "transferability/logme": "LogME",
    "transferability/leep": "LEEP",
    "transferability/nce": "NCE",
    "transferability/hscore": "H-score",
    "data.target_train_size": "target labels",
    "target.lr": "target learning rate",
    "source.lr": "source learning rate",
    "freeze": "freeze policy",
    "wise_ft/alpha": "WiSE-FT α (0 = start of target, 1 = fine-tuned)",
    "diagnostics/rel_change": "relative weight change ‖θ−θ₀‖/‖θ₀‖",
    "diagnostics/cka": "linear CKA, start vs tuned features",
    "block": "block (input → output)",
}
WORDS = {"acc": "accuracy", "f1": "F1", "lr": "learning rate", "ood": "OOD", "id": "ID",
         "mb": "MB", "val": "validation", "params": "parameters", "s": "(s)"}


@dataclass
class Plot:
    figure: Figure
    caption: str
    files: list[Path] = field(default_factory=list)  # [pdf, png] once saved

    def markdown(self, relative_to: Path | str = ".") -> str:
        """The report.md lines: the PNG and its caption (the PDF sits beside it for LaTeX)."""
        png = Path(self.files[-1]).relative_to(relative_to).as_posix() if self.files else "(not saved)"
        return f"![{self.caption}]({png})\n\n*{self.caption}*"


# ---------------------------------------------------------------------------------------------
# Names, kinds, limits


def axis_label(key: str) -> str:
    """LABELS[key], else the key's words with abbreviations spelled out."""
    if key in LABELS:
        return LABELS[key]
    words = [w for w in re.split(r"[/._\s]+", key) if w]
    return " ".join(WORDS.get(w.lower(), w) for w in words) or key


def metric_kind(key: str) -> str:
    """"difference" (gain, forgetting: signed, 0 matters), "bounded" (accuracy-like, in [0, 1]),
    "nonnegative" (times, counts, memory, throughput) or "free"."""
    if key.startswith("transfer/") or key.endswith(("_diff", "/gain", "/forgetting")):
        return "difference"
    if re.search(r"(^|[/_])(acc|f1|accuracy|cka)($|[/_])", key):
        return "bounded"
    if key.startswith(("efficiency/", "time/", "params/")) or key.endswith("rel_change"):
        return "nonnegative"
    return "free"


def y_limits(key: str, lows: Sequence[float], highs: Sequence[float]) -> tuple[float, float] | None:
    """The y-range for `key` given the data's extent (error bars included); None: autoscale."""
    lows, highs = [v for v in lows if math.isfinite(v)], [v for v in highs if math.isfinite(v)]
    if not lows:
        return None
    lo, hi = min(lows), max(highs)
    kind = metric_kind(key)
    if kind == "nonnegative":
        return min(lo, 0.0), hi * 1.08 if hi > 0 else 1.0  # a negative value would be a bug: show it
    if kind == "free":
        return None
    if kind == "difference":
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    span = max(hi - lo, MIN_SPAN) * 1.1  # 5% air on each side
    centre = (lo + hi) / 2
    low, high = centre - span / 2, centre + span / 2
    if kind == "bounded":  # slide the window into [0, 1] rather than cut it
        low, high = (low, high) if low >= 0 else (0.0, span)
        low, high = (low, high) if high <= 1 else (1.0 - span, 1.0)
        low, high = max(low, 0.0), min(high, 1.0)
    return low, high


def _ci(point: Mapping) -> float:
    """The error-bar half-width, NaN (no bar) when n < 2 or the interval is missing."""
    ci = point.get("ci", math.nan)
    return ci if point.get("n", 0) >= 2 and ci is not None and math.isfinite(ci) else math.nan


def _wrap(text: str, width: int = 16) -> str:
    return "\n".join(textwrap.wrap(str(text), width, break_long_words=False, break_on_hyphens=False)) or str(text)


def _n_text(points: Sequence[Mapping]) -> str:
    ns = sorted({int(p.get("n", 0)) for p in points})
    text = f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]}"
    return text + " seeds" + ("; settings with n = 1 have no interval" if 1 in ns and len(ns) > 1 else
                              "; no interval with one seed" if ns == [1] else "")


@contextmanager
def style():
    with mpl.rc_context(STYLE):
        yield


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]  # not str.capitalize: "entity F1" stays F1


def _legend(ax) -> None:
    """Outside the axes, on the right: a legend never covers a point or an error bar."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _reference(ax, y: float, label: str | None = None) -> None:
    """A dashed horizontal line, named in place (a legend entry for one line wastes a column)."""
    ax.axhline(y, color="0.4", linewidth=0.8, linestyle="--", zorder=0, gid=REFERENCE)
    if label:
        ax.annotate(label, xy=(0.99, y), xycoords=("axes fraction", "data"), xytext=(0, 2),
                    textcoords="offset points", ha="right", va="bottom", fontsize=7, color="0.3")


def log_x_axis(ax) -> None:
    """A log x axis labelled 1, 2, 5 per decade in plain numbers: matplotlib labels every minor
    tick of an axis spanning under two decades, in 2×10¹ notation, and they run together."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _finish(ax, ykey: str, lows, highs) -> None:
    limits = y_limits(ykey, lows, highs)
    if limits is not None:
        ax.set_ylim(*limits)
    if metric_kind(ykey) == "difference":
        _reference(ax, 0.0)


def save(plot: Plot, stem: str | Path) -> Plot:
    """Write stem.pdf and stem.png (DPI); return the plot with its files."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with style():
        plot.files = [stem.with_suffix(".pdf"), stem.with_suffix(".png")]
        plot.figure.savefig(plot.files[0])
        plot.figure.savefig(plot.files[1], dpi=DPI)
    return plot


def _done(fig: Figure, caption: str, save_to) -> Plot:
    plot = Plot(fig, caption)
    return save(plot, save_to) if save_to is not None else plot


# ---------------------------------------------------------------------------------------------
# Builders


def categorical(points: Sequence[Mapping], metric: str, xkey: str = "setting", reference: float | None = None,
                reference_label: str | None = None, ylabel: str | None = None,
                save_to: str | Path | None = None) -> Plot:
    """One point ± 95% CI per categorical setting, in the given order; no connecting lines.

    A point may carry "group" (another swept key's value): groups sit side by side at each
    category, one colour and marker each, with a legend. `reference` draws a dashed horizontal
    line (e.g. the majority-class baseline, or the baseline arm's mean). `ylabel` replaces
    axis_label(metric) when the groups are different metrics (ID vs OOD accuracy); `metric` still
    decides the axis rules."""
    with style():
        fig = Figure()
        ax = fig.add_subplot()
        labels = list(dict.fromkeys(p["label"] for p in points))
        groups = list(dict.fromkeys(p.get("group") for p in points))
        width = 0.6 / len(groups) if len(groups) > 1 else 0.0
        lows, highs = [], []
        for g, group in enumerate(groups):
            members = [p for p in points if p.get("group") == group]
            x = np.array([labels.index(p["label"]) + (g - (len(groups) - 1) / 2) * width for p in members])
            y = np.array([p["mean"] for p in members], dtype=float)
            ci = np.array([_ci(p) for p in members])
            colour, marker = OKABE_ITO[g % len(OKABE_ITO)], MARKERS[g % len(MARKERS)]
            ax.plot(x, y, linestyle="none", marker=marker, color=colour, zorder=3, gid=DATA,
                    label=None if group is None else _wrap(group, 30))
            has_bar = np.isfinite(ci)
            if has_bar.any():
                ax.errorbar(x[has_bar], y[has_bar], yerr=ci[has_bar], fmt="none", ecolor=colour, zorder=2)
            lows += list(np.where(has_bar, y - ci, y))
            highs += list(np.where(has_bar, y + ci, y))
        ns = {label: sorted({int(p.get("n", 0)) for p in points if p["label"] == label}) for label in labels}
        n_of = {label: "n=" + "/".join(map(str, ns[label])) for label in labels}
        if len(labels) > 5 or max(len(str(label)) for label in labels) > 16:  # one slanted line each
            fig.set_size_inches(max(4.8, 0.55 * len(labels) + 1.5), 3.3)
            ax.set_xticks(range(len(labels)), [f"{label} ({n_of[label]})" for label in labels],
                          rotation=30, ha="right", rotation_mode="anchor")
        else:
            ax.set_xticks(range(len(labels)), [f"{_wrap(label)}\n{n_of[label]}" for label in labels])
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.grid(False, axis="x")
        if reference is not None:
            _reference(ax, reference, reference_label)
            lows.append(reference)
            highs.append(reference)
        _finish(ax, metric, lows, highs)
        ax.set_xlabel(axis_label(xkey))
        ax.set_ylabel(ylabel or axis_label(metric))
        if len(groups) > 1:
            _legend(ax)
    dashed = f"; dashed: {reference_label}" if reference is not None and reference_label else ""
    caption = (f"{_sentence(ylabel or axis_label(metric))} by {axis_label(xkey)}: mean ± 95% t-interval over seeds "
               f"({_n_text(points)}){dashed}.")
    return _done(fig, caption, save_to)


def numeric(series: Mapping[str, Sequence[Mapping]], metric: str, xkey: str, logx: bool | None = None,
            save_to: str | Path | None = None) -> Plot:
    """A numeric hyper-parameter on x: one line per series (name → points with "x"), sorted by x,
    mean ± 95% CI. logx=None: log scale when every x > 0 and they span ≥ 100×."""
    all_points = [p for points in series.values() for p in points]
    xs = [float(p["x"]) for p in all_points]
    if logx is None:
        logx = min(xs) > 0 and max(xs) / min(xs) >= 100
    with style():
        fig = Figure()
        ax = fig.add_subplot()
        lows, highs = [], []
        for s, (name, points) in enumerate(series.items()):
            points = sorted(points, key=lambda p: float(p["x"]))
            x = np.array([float(p["x"]) for p in points])
            y = np.array([p["mean"] for p in points], dtype=float)
            ci = np.array([_ci(p) for p in points])
            colour, marker = OKABE_ITO[s % len(OKABE_ITO)], MARKERS[s % len(MARKERS)]
            ax.plot(x, y, marker=marker, color=colour, gid=DATA, label=_wrap(name, 30) if len(series) > 1 else None)
            has_bar = np.isfinite(ci)
            if has_bar.any():
                ax.errorbar(x[has_bar], y[has_bar], yerr=ci[has_bar], fmt="none", ecolor=colour)
            for xi, yi, p in zip(x, y, points):
                if int(p.get("n", 0)) == 1:
                    ax.annotate("n=1", (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=7, color=colour)
            lows += list(np.where(has_bar, y - ci, y))
            highs += list(np.where(has_bar, y + ci, y))
        if logx:
            log_x_axis(ax)
        if len(set(xs)) <= 8:  # few values: tick each one, as it was swept
            ax.set_xticks(sorted(set(xs)), [f"{v:g}" for v in sorted(set(xs))])
            ax.minorticks_off()
        _finish(ax, metric, lows, highs)
        ax.set_xlabel(axis_label(xkey) + (" (log scale)" if logx else ""))
        ax.set_ylabel(axis_label(metric))
        if len(series) > 1:
            _legend(ax)
    caption = (f"{_sentence(axis_label(metric))} against {axis_label(xkey)}: mean ± 95% t-interval over seeds "
               f"({_n_text(all_points)}).")
    return _done(fig, caption, save_to)


def without_common_key(labels: list[str]) -> list[str]:
    """Labels without the "key=" they all start with ("+ablation/baselines=none" → "none"), so
    points close together keep readable names; unchanged when they do not share one."""
    prefix = os.path.commonprefix(labels) if len(labels) > 1 else ""
    prefix = prefix[:prefix.rfind("=") + 1] if "=" in prefix else ""
    if not prefix or " " in prefix or any(" " in label[len(prefix):] for label in labels):
        return labels  # several keys per setting: one shared key alone does not name them
    return [label[len(prefix):] or label for label in labels]


def scatter(points: Sequence[Mapping], xkey: str, ykey: str, logx: bool | None = None, note: str | None = None,
            save_to: str | Path | None = None) -> Plot:
    """One labelled point per setting: points carry "label", "x", "y" and optionally "xerr",
    "yerr" (95% half-widths, NaN: none) and "n". For score vs outcome, metric vs trainable
    parameters, metric vs time. logx=None: log scale for counts/times spanning ≥ 10×.
    `note` (e.g. "Kendall τ = 0.6, p = 0.03") goes into the caption and the corner of the plot."""
    x = np.array([float(p["x"]) for p in points])
    y = np.array([float(p["y"]) for p in points])
    xerr = np.array([_err(p, "xerr") for p in points])
    yerr = np.array([_err(p, "yerr") for p in points])
    if logx is None:
        logx = metric_kind(xkey) == "nonnegative" and x.min() > 0 and x.max() / x.min() >= 10
    with style():
        fig = Figure()
        ax = fig.add_subplot()
        ax.grid(True, axis="both")
        ax.errorbar(x, y, xerr=np.nan_to_num(xerr), yerr=np.nan_to_num(yerr), fmt="none", ecolor="0.55",
                    elinewidth=0.9, zorder=2)
        ax.plot(x, y, linestyle="none", marker="o", color=OKABE_ITO[0], zorder=3, gid=DATA)
        if logx:
            log_x_axis(ax)
        ax.margins(x=0.08)
        limits = y_limits(ykey, list(y - np.nan_to_num(yerr)), list(y + np.nan_to_num(yerr)))
        if limits is not None:
            ax.set_ylim(*limits)
        if metric_kind(xkey) == "nonnegative" and not logx:
            ax.set_xlim(left=0)
        position = np.log10(x) if logx else x
        middle = (position.min() + position.max()) / 2
        labels = [_wrap(label, 22) for label in without_common_key([p["label"] for p in points])]
        place_labels(fig, ax, x, y, labels, point_left=position > middle)
        if note:
            ax.text(0.02, 0.97, note, transform=ax.transAxes, va="top", fontsize=8)
        ax.set_xlabel(axis_label(xkey) + (" (log scale)" if logx else ""))
        ax.set_ylabel(axis_label(ykey))
    bars = "; bars: 95% t-intervals" if np.isfinite(xerr).any() or np.isfinite(yerr).any() else ""
    caption = (f"{_sentence(axis_label(ykey))} against {axis_label(xkey)}, one point per setting "
               f"(mean over seeds{bars})" + (f"; {note}" if note else "") + ".")
    return _done(fig, caption, save_to)


def place_labels(fig: Figure, ax, x, y, labels: Sequence[str], point_left) -> None:
    """One label beside each point, at the first of a few spots (inward side first, so labels stay
    inside; then below, above) where it overlaps no label placed already, no other point, and
    stays within the axes; where none is free, the first spot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    FigureCanvasAgg(fig)  # a renderer, to measure the text
    renderer = fig.canvas.get_renderer()
    ax.get_xlim(), ax.get_ylim()  # settle autoscaling before reading positions
    centres = ax.transData.transform(np.column_stack([x, y]))
    radius = 3.5 * fig.dpi / 72  # the marker's, in pixels
    markers = [Bbox.from_bounds(cx - radius, cy - radius, 2 * radius, 2 * radius) for cx, cy in centres]
    frame, placed = ax.get_window_extent(renderer), []
    for i, (xi, yi, label, left) in enumerate(zip(x, y, labels, point_left)):
        sides = [(-5, "right"), (5, "left")] if left else [(5, "left"), (-5, "right")]
        spots = [(dx, 3, ha) for dx, ha in sides] + [(dx, -10, ha) for dx, ha in sides] + [(0, 7, "center"),
                                                                                           (0, -14, "center")]
        text = ax.annotate(label, (xi, yi), xytext=spots[0][:2], textcoords="offset points", fontsize=7)

        def box_at(dx, dy, ha):
            text.xyann = (dx, dy)
            text.set_horizontalalignment(ha)
            return text.get_window_extent(renderer)

        for spot in spots:
            box = box_at(*spot)
            if (not any(box.overlaps(b) for b in placed)
                    and not any(box.overlaps(m) for j, m in enumerate(markers) if j != i)
                    and frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1):
                break
        else:
            box = box_at(*spots[0])  # nowhere free: the first spot
        placed.append(box)


def wise_ft(alphas: Sequence[float], curves: Mapping[str, Sequence[Mapping]], save_to: str | Path | None = None) -> Plot:
    """WiSE-FT: accuracy against the mixing weight α ∈ [0, 1] (θ(α) = (1−α)θ₀ + αθ_ft), one line
    per metric key (e.g. target/test_acc, target/ood_test_acc, source/test_acc_after), each a list
    of points aligned with alphas."""
    series = {_wise_ft_name(key): [dict(p, x=a) for a, p in zip(alphas, points)] for key, points in curves.items()}
    plot = numeric(series, "accuracy", "wise_ft/alpha", logx=False)
    ax = plot.figure.axes[0]
    with style():
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylabel("accuracy")
    points = [p for ps in curves.values() for p in ps]
    plot.caption = ("WiSE-FT: accuracy of the weight interpolation (1−α)·θ₀ + α·θ_ft against α, "
                    f"in-distribution, out-of-distribution and source; mean ± 95% t-interval ({_n_text(points)}).")
    return save(plot, save_to) if save_to is not None else plot


def _wise_ft_name(key: str) -> str:
    if key.startswith("target/ood_"):
        return "OOD (" + axis_label(key) + ")"
    if key.startswith("target/"):
        return "ID (" + axis_label(key) + ")"
    if key.startswith("source/"):
        return "source (" + axis_label(key).replace(" after transfer", "") + ")"
    return axis_label(key)


def _err(point: Mapping, key: str) -> float:
    value = point.get(key, math.nan)
    if value is None or not math.isfinite(value) or point.get("n", 2) < 2:
        return math.nan
    return value


# ---------------------------------------------------------------------------------------------
# The stability–plasticity front, and aggregates across tasks


def front(series: Mapping[str, Sequence[Mapping]], xkey: str, ykey: str, x_higher: bool = True,
          y_higher: bool = True, front_points: Sequence[tuple[float, float]] = (),
          reference: tuple[float, float] | None = None, note: str | None = None,
          save_to: str | Path | None = None) -> Plot:
    """Target metric (y) against retention (x), one colour and marker per method (series name →
    points with "x", "y", optional "xerr", "yerr" (95% half-widths), "n", "label"); the Pareto
    front over all points as a staircase (`front_points`, the non-dominated (x, y) means); the
    hypervolume reference point as a cross. A lower-is-better axis is inverted, so better is always
    up and to the right."""
    with style():
        fig = Figure(figsize=(5.6, 3.6))
        ax = fig.add_subplot()
        ax.grid(True, axis="both")
        xs, ys, labels = [], [], []
        for s, (name, points) in enumerate(series.items()):
            x = np.array([float(p["x"]) for p in points])
            y = np.array([float(p["y"]) for p in points])
            xerr = np.nan_to_num(np.array([_err(p, "xerr") for p in points]))
            yerr = np.nan_to_num(np.array([_err(p, "yerr") for p in points]))
            colour, marker = OKABE_ITO[s % len(OKABE_ITO)], MARKERS[s % len(MARKERS)]
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor=colour, elinewidth=0.8, alpha=0.6, zorder=2)
            ax.plot(x, y, linestyle="none", marker=marker, color=colour, zorder=3, gid=DATA, label=_wrap(name, 24))
            xs += list(x)
            ys += list(y)
            labels += [str(p.get("label") or "") if p.get("front") else "" for p in points]
        if len(front_points):
            sx, sy = (1 if x_higher else -1), (1 if y_higher else -1)
            f = sorted(((sx * x, sy * y) for x, y in front_points))  # oriented: x ascending, y descending
            steps = [f[0]]
            for (x0, _), (x1, y1) in zip(f, f[1:]):
                steps += [(x0, y1), (x1, y1)]
            ax.plot([sx * x for x, _ in steps], [sy * y for _, y in steps], color="0.15", linewidth=1.0,
                    linestyle="--", zorder=1, label="Pareto front", gid="front")
        if reference is not None:
            ax.plot([reference[0]], [reference[1]], marker="x", color="0.3", linestyle="none", zorder=3,
                    label="HV reference", gid=REFERENCE)
        if not x_higher:
            ax.invert_xaxis()
        if not y_higher:
            ax.invert_yaxis()
        ax.margins(0.08)
        named = [i for i, t in enumerate(labels) if t]
        if named and len(named) <= 16:  # only the front's points are named: a cloud of labels would overlap
            position = np.array(xs)[named] * (1 if x_higher else -1)
            middle = (position.min() + position.max()) / 2
            place_labels(fig, ax, np.array(xs)[named], np.array(ys)[named], [_wrap(labels[i], 16) for i in named],
                         point_left=position > middle)
        if note:
            ax.text(0.02, 0.02, note, transform=ax.transAxes, va="bottom", fontsize=7, color="0.3")
        def name(key: str, higher: bool) -> str:  # an inverted axis says so: lower values sit up / right
            base = axis_label(key).replace(" (lower is better)", "")
            return base if higher else f"{base} (lower is better; axis inverted)"

        ax.set_xlabel(name(xkey, x_higher))
        ax.set_ylabel(_wrap(name(ykey, y_higher), 34))
        _legend(ax)
    n_points = [p for points in series.values() for p in points]
    caption = (f"Stability–plasticity front: {axis_label(ykey)} against {axis_label(xkey)}, one point per setting "
               f"(mean over seeds, bars: 95% t-intervals; {_n_text(n_points)}); dashed: the Pareto front over all "
               "settings, its points named by their knobs; better is up and to the right" + ("; ×: the hypervolume reference point" if reference is not None else "") + ".")
    return _done(fig, caption, save_to)


def intervals(rows: Sequence[Mapping], statistics: Sequence[str], xlabel: str, save_to: str | Path | None = None) -> Plot:
    """Aggregate estimates with their intervals: one panel per statistic (e.g. IQM, mean), one row per
    method; rows carry "label" and per statistic a dict {"value", "low", "high"}."""
    with style():
        fig = Figure(figsize=(2.4 * len(statistics) + 1.4, 0.35 * len(rows) + 1.1))
        axes = fig.subplots(1, len(statistics), sharey=True, squeeze=False)[0]
        labels = [r["label"] for r in rows]
        for a, (ax, name) in enumerate(zip(axes, statistics)):
            for i, r in enumerate(rows):
                s = r[name]
                colour = OKABE_ITO[i % len(OKABE_ITO)]
                if math.isfinite(s.get("low", math.nan)):
                    ax.plot([s["low"], s["high"]], [i, i], color=colour, linewidth=5, alpha=0.45, solid_capstyle="butt")
                ax.plot([s["value"]], [i], marker="|", markersize=10, color=colour, gid=DATA)
            ax.set_title(name)
            ax.grid(True, axis="x")
            ax.grid(False, axis="y")
            ax.set_xlabel(xlabel)
            ax.margins(x=0.1)
        axes[0].set_yticks(range(len(labels)), labels)
        axes[0].set_ylim(len(labels) - 0.5, -0.5)
    caption = (f"{', '.join(statistics)} of {xlabel} per method over all tasks and seeds; bars: 95% stratified "
               "bootstrap intervals (Agarwal et al. 2021).")
    return _done(fig, caption, save_to)


def profiles(curves: Mapping[str, Mapping], xlabel: str, save_to: str | Path | None = None) -> Plot:
    """Performance profiles: per method (name → {"taus", "profile", "low", "high"}) the fraction of
    runs scoring above τ, with its bootstrap band."""
    with style():
        fig = Figure()
        ax = fig.add_subplot()
        ax.grid(True, axis="both")
        for s, (name, c) in enumerate(curves.items()):
            colour = OKABE_ITO[s % len(OKABE_ITO)]
            ax.plot(c["taus"], c["profile"], color=colour, label=_wrap(name, 24), gid=DATA,
                    linestyle=["-", "--", "-.", ":"][s % 4])
            if np.isfinite(c["low"]).any():
                ax.fill_between(c["taus"], c["low"], c["high"], color=colour, alpha=0.15, linewidth=0)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"{xlabel} threshold τ")
        ax.set_ylabel("fraction of runs with score > τ")
        _legend(ax)
    caption = (f"Performance profiles: the fraction of runs (each task weighted equally) whose {xlabel} exceeds τ; "
               "bands: 95% stratified bootstrap (Agarwal et al. 2021).")
    return _done(fig, caption, save_to)
