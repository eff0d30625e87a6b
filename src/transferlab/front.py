"""The stability–plasticity front (issue 26 item 2): target metric against what the source keeps.

Each setting of the sweep (an arm at one grid point of its knobs: `tuning.arms_and_grids`) is a
point: x = *retention*, the source task's metric after transfer (`source/test_<m>_after`: accuracy,
higher is better; perplexity, lower is better), or, when the runs have none, the forgetting
(`transfer/forgetting`, lower is better — in perplexity, Δ perplexity); y = the target test metric
(`target/test_<primary>`, in the task's direction). Means over seeds with 95% t-intervals.

- The **Pareto front** over all points: those no other point beats on both axes (each axis in its
  own direction).
- Each method's **hypervolume**: the area its points dominate, bounded by one **reference point**
  for all methods (so they are comparable): by default the worst observed mean on each axis; a
  reference given with `--front-reference X,Y` (in the metrics' units) is used when every point is
  at least as good as it on both axes, else the report says it is inside the data (it would cut
  points off) and uses the worst observed. With the worst observed point as reference, a method
  whose every point is worst on one axis has hypervolume 0: the reference is part of the result,
  and is stated with it.
- A **percentile bootstrap interval** over seeds for each hypervolume (`stats.bootstrap_hypervolume`:
  seeds redrawn with replacement, a seed's runs kept together across the method's points; the
  reference held fixed).
- A figure (PDF + PNG): the points with both intervals, the front as a staircase, the reference;
  an axis whose metric is lower-is-better is inverted so that better is always up and to the right.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from transferlab import figures, stats
from transferlab.evidence import (NO_VALUE, higher_is_better, mean_ci_text, metric_direction, primary, row,
                                  slug, source_metric)
from transferlab.tuning import arms_and_grids

BOOTSTRAP_REPS = 1000


def retention_key(runs: list[dict]) -> str | None:
    s = source_metric(runs)
    if s is not None and any(r["metrics"].get(f"source/test_{s}_after") is not None for r in runs):
        return f"source/test_{s}_after"
    if any(r["metrics"].get("transfer/forgetting") is not None for r in runs):
        return "transfer/forgetting"
    return None


def parse_reference(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    x, y = (float(v) for v in str(text).split(","))
    return x, y


def _short(grid: str) -> str:
    """"regularizer.alpha=0.01 target.lr=0.003" → "alpha=0.01 lr=0.003"."""
    return " ".join(part.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + part.split("=", 1)[1] if "=" in part else part
                    for part in grid.split()) if grid != "(default)" else ""


def front_section(runs: list[dict], plots: Path, out_dir: Path, reference: tuple[float, float] | None = None,
                  tune_keys: list[str] | None = None, reps: int = BOOTSTRAP_REPS) -> list[str]:
    completed = [r for r in runs if r["status"] == "completed"]
    xkey = retention_key(completed)
    ykey = f"target/test_{primary(completed)}"
    if xkey is None:
        return []
    x_higher, y_higher = metric_direction(xkey, completed), higher_is_better(completed)
    maximize = (x_higher, y_higher)
    arms, _ = arms_and_grids(completed, tune_keys)
    methods: dict[str, list[dict]] = {}  # arm → its points
    left_out = []
    for arm, grid in arms.items():
        for label, members in grid.items():
            sx = stats.mean_ci([r["metrics"].get(xkey) for r in members])
            sy = stats.mean_ci([r["metrics"].get(ykey) for r in members])
            if not (sx["n"] and sy["n"]):
                left_out.append(arm if len(grid) == 1 else f"{arm} {label}")
                continue
            methods.setdefault(arm, []).append({"grid": label, "members": members, "x": sx, "y": sy})
    points = [(p["x"]["mean"], p["y"]["mean"]) for ps in methods.values() for p in ps]
    if len(points) < 2:
        return []
    worst = stats.worst_point(points, maximize)
    note = ""
    if reference is None:
        ref, ref_text = worst, "the worst observed mean on each axis"
    elif stats.reference_is_valid(reference, points, maximize):
        ref, ref_text = reference, "given (`--front-reference`)"
    else:
        ref, ref_text = worst, "the worst observed mean on each axis"
        note = (f"The given reference ({reference[0]:g}, {reference[1]:g}) is inside the data: some points are worse "
                f"than it on an axis and would be cut off. Using the worst observed ({worst[0]:.4g}, {worst[1]:.4g}) "
                "instead. ")
    on_front = set(stats.pareto_front(points, maximize))
    lines = ["## Stability–plasticity front", "",
             f"Each setting: {ykey} ({'higher' if y_higher else 'lower'} is better) against retention {xkey} "
             f"({'higher' if x_higher else 'lower'} is better), mean ± 95% CI over seeds. Front: the settings no "
             f"other setting beats on both. Hypervolume (HV): the area a method's points dominate up to the "
             f"reference point ({ref[0]:.4g}, {ref[1]:.4g}) — {ref_text}; the same for every method, in units of "
             f"{xkey} × {ykey}; 95% percentile bootstrap over seeds ({reps} draws; the reference held fixed). "
             + note, "",
             row(["method", "setting", "n", ykey, xkey, "on the front"]),
             row(["---", "---", "---:", "---:", "---:", "---"])]
    i = 0
    front_xy = []
    for arm, ps in methods.items():
        for p in ps:
            front = i in on_front
            if front:
                front_xy.append(points[i])
            lines.append(row([arm, p["grid"], str(min(p["x"]["n"], p["y"]["n"])), mean_ci_text(p["y"]),
                              mean_ci_text(p["x"]), "**yes**" if front else ""]))
            i += 1
    lines += ["", row(["method", "points", "HV", "95% bootstrap interval", "seeds"]), row(["---", "---:", "---:", "---:", "---:"])]
    for arm, ps in methods.items():
        seeds = sorted({r["config"].get("seed") for p in ps for r in p["members"]}, key=str)
        xs = np.full((len(ps), len(seeds)), np.nan)
        ys = np.full((len(ps), len(seeds)), np.nan)
        for a, p in enumerate(ps):
            for r in p["members"]:
                j = seeds.index(r["config"].get("seed"))
                x, y = r["metrics"].get(xkey), r["metrics"].get(ykey)
                if x is not None and y is not None:
                    xs[a, j], ys[a, j] = x, y
        hv = stats.bootstrap_hypervolume(xs, ys, ref, maximize, reps=reps)
        interval = NO_VALUE if math.isnan(hv["low"]) else f"[{hv['low']:.4g}, {hv['high']:.4g}]"
        lines.append(row([arm, str(len(ps)), f"{hv['hv']:.4g}", interval, str(hv["n_seeds"])]))
    all_hv = stats.hypervolume(points, ref, maximize)
    lines.append(row(["(all: the front)", str(len(points)), f"{all_hv:.4g}", NO_VALUE, ""]))
    if left_out:
        lines += ["", f"Not on the plot (no {xkey} or no {ykey}, e.g. scratch has no source): "
                      f"{', '.join(f'`{a}`' for a in left_out)}."]
    series = {arm: [{"x": p["x"]["mean"], "xerr": p["x"]["ci"], "y": p["y"]["mean"], "yerr": p["y"]["ci"],
                     "n": min(p["x"]["n"], p["y"]["n"]), "label": _short(p["grid"]) or arm,
                     "front": (p["x"]["mean"], p["y"]["mean"]) in front_xy} for p in ps]
              for arm, ps in methods.items()}
    plot = figures.front(series, xkey, ykey, x_higher, y_higher, front_xy, ref,
                         save_to=plots / f"front_{slug(ykey)}_vs_{slug(xkey)}")
    return lines + ["", plot.markdown(out_dir), ""]

