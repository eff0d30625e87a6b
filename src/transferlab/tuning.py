"""Tune each arm, then compare: the report's per-arm selection on validation (issue 26 item 1).

A sweep where each *arm* (a method: `+ablation/regularizer=l2sp`, `regularizer=ewc`, `freeze=lora`)
has its own grid of *knobs* (hyper-parameters: `regularizer.alpha`, `target.lr`, `freeze.r`) over the
same seeds. A knob is a swept key under a hyper-parameter group (HPARAM_GROUPS: target, regularizer,
freeze, optimizer, scheduler, extra_regularizers; not data, source or backbone, whose values define
the task, not the recipe), or any key given with `--tune KEY`; every other swept key (minus the
seed) names the arm. The mode is on when some arm has more than one grid point (`--tune` forces
it, `--no-tune` turns it off).

Protocol (DomainBed, Gulrajani & Lopez-Paz 2021, and its issue #111: the hyper-parameter seed is
not the trial seed):
1. Seeds. *Selection seeds* choose the setting; *comparison seeds* measure it. `auto`: when some
   seeds ran only at some grid points (a second phase that reran each arm's selected setting on new
   seeds), selection uses the seeds every grid point ran and comparison the others; otherwise, with
   ≥ 4 seeds at every grid point, the first half (in seed order) selects and the second half
   compares; with fewer, both reuse the same seeds, and the report says so (the selected setting's
   test numbers then share the selection's seed noise). `--selection-seeds 0,1,2` (or `0-4`) sets
   them (comparison: the others, or the same when none are left); `all`: reuse.
2. Selection, per arm: a grid point is *complete* when it has a completed run with a validation
   value (`target/val_<primary metric>`) for every selection seed; the selected point has the best
   mean validation over the selection seeds, in the task's direction (results.json
   `task.higher_is_better`); ties: the first in grid order. The test split is never read here.
   An arm with no complete grid point is named and left out of the comparison.
3. Flatness: the spread of mean validation across the arm's complete grid points (best − worst),
   and how many lie within the selected point's 95% CI — a flat curve means the choice hardly
   matters, a steep one that an untuned arm would have been misjudged.
4. Comparison: each arm's selected setting on the comparison seeds: test mean ± 95% CI, and the
   paired comparison (by seed) against the baseline arm (`--baseline`: an arm label; default the
   arm named `none`, else the first) with Holm's correction across arms, for every reported metric.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from transferlab import figures, stats
from transferlab.evidence import (NO_VALUE, compared_metrics, fmt, higher_is_better, is_number, mean_ci_text,
                                  metric_direction, p_text, primary, row, slug)

HPARAM_GROUPS = ("target", "regularizer", "freeze", "optimizer", "scheduler", "extra_regularizers")
NO_ARM = "(one arm)"
AUTO, ALL = "auto", "all"
LISTED_FIGURES = 8  # validation-curve figures at most (one per tuned arm)


def is_knob(key: str, tune_keys: list[str] | None = None) -> bool:
    if tune_keys:
        return key in tune_keys
    head = key.split(".", 1)[0]
    return "." in key and head in HPARAM_GROUPS and not key.endswith("_target_")


def arm_label(params: dict, arm_keys: list[str]) -> str:
    """`l2sp` for the one arm key `+ablation/regularizer=l2sp` (a preset named by its option), else
    `key=value` joined; NO_ARM when the sweep has no arm key."""
    present = [k for k in arm_keys if k in params]
    if not present:
        return NO_ARM
    if len(arm_keys) == 1:
        value = str(params[present[0]])
        return value if "/" in present[0] or present[0] in HPARAM_GROUPS else f"{present[0]}={value}"
    return " ".join(f"{k.rsplit('/', 1)[-1]}={params[k]}" for k in present)


def grid_label(params: dict, knobs: list[str]) -> str:
    return " ".join(f"{k}={params[k]}" for k in knobs if k in params) or "(default)"


def _order(value: str):
    return (0, float(value), "") if is_number(value) else (1, 0.0, value)


def arms_and_grids(runs: list[dict], tune_keys: list[str] | None = None) -> tuple[dict, list[str]]:
    """({arm: {grid label: [runs]}} in order of first appearance, grid points sorted by knob
    values; the knob keys)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.get("params", {})))
    knobs = [k for k in keys if is_knob(k, tune_keys)]
    arm_keys = [k for k in keys if k not in knobs]
    arms: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        params = r.get("params", {})
        arms.setdefault(arm_label(params, arm_keys), {}).setdefault(grid_label(params, knobs), []).append(r)
    for arm, grid in arms.items():
        def sort_key(label: str, grid=grid) -> list:
            params = grid[label][0].get("params", {})
            return [_order(str(params.get(k, ""))) for k in knobs]
        arms[arm] = {label: grid[label] for label in sorted(grid, key=sort_key)}
    return arms, knobs


def is_tuning_sweep(runs: list[dict], tune_keys: list[str] | None = None) -> bool:
    arms, knobs = arms_and_grids(runs, tune_keys)
    return bool(knobs) and any(len(grid) > 1 for grid in arms.values())


def parse_seeds(spec: str) -> list[int]:
    """"0,1,2" or "0-4" or "0-2,7" → seeds."""
    seeds: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)-(-?\d+)", part)
        seeds += list(range(int(m[1]), int(m[2]) + 1)) if m else [int(part)]
    return seeds


def _seed_key(seed):
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def split_seeds(arms: dict, spec: str | None = AUTO) -> tuple[list, list, str]:
    """(selection seeds, comparison seeds, the sentence that says how they were chosen)."""
    seeds_of = [{r["config"].get("seed") for r in members} for grid in arms.values() for members in grid.values()]
    every = sorted(set.union(*seeds_of), key=_seed_key) if seeds_of else []
    common = sorted(set.intersection(*seeds_of), key=_seed_key) if seeds_of else []
    spec = AUTO if spec is None else spec
    if spec == ALL:
        return every, every, "Selection and comparison reuse the same seeds (`--selection-seeds all`)."
    if spec != AUTO:
        chosen = [s for s in every if s in set(parse_seeds(spec))]
        rest = [s for s in every if s not in set(chosen)]
        if not rest:
            return chosen, chosen, (f"Selection seeds {_seeds(chosen)} (given); no other seeds ran, so the comparison "
                                    "reuses them: its test numbers share the selection's seed noise.")
        return chosen, rest, f"Selection on seeds {_seeds(chosen)} (given), comparison on seeds {_seeds(rest)}."
    extra = [s for s in every if s not in set(common)]
    if common and extra:
        return common, extra, (f"Selection on the seeds every grid point ran ({_seeds(common)}), comparison on the "
                               f"seeds that ran only some settings ({_seeds(extra)}): disjoint.")
    if len(common) >= 4:
        half = len(common) // 2
        return common[:half], common[half:], (
            f"Selection on seeds {_seeds(common[:half])}, comparison on seeds {_seeds(common[half:])}: the sweep's "
            f"{len(common)} seeds split in two halves, so the hyper-parameter seeds are not the trial seeds "
            "(DomainBed #111); `--selection-seeds all` reuses them all for both.")
    return common, common, (f"Selection and comparison reuse the same seeds ({_seeds(common)}): fewer than 4 seeds at "
                            "every grid point, too few to keep apart. The selected settings' test numbers share the "
                            "selection's seed noise (slightly optimistic); run ≥ 4 seeds, or rerun each selected "
                            "setting on new seeds (the report then compares on those).")


def _seeds(seeds: list) -> str:
    return ", ".join(map(str, seeds)) or NO_VALUE


def select(grid: dict[str, list[dict]], selection_seeds: list, val_key: str, higher: bool) -> dict:
    """The arm's validation curve over the selection seeds and its selected grid point."""
    wanted = set(selection_seeds)
    points = []
    for label, members in grid.items():
        by_seed = {r["config"].get("seed"): r["metrics"].get(val_key) for r in members
                   if r["status"] == "completed" and r["config"].get("seed") in wanted}
        have = {s for s, v in by_seed.items() if v is not None and not math.isnan(float(v))}
        summary = stats.mean_ci([by_seed[s] for s in have])
        points.append({"grid": label, "complete": bool(wanted) and have >= wanted, "missing": sorted(wanted - have, key=_seed_key),
                       "params": members[0].get("params", {}), **summary})
    complete = [p for p in points if p["complete"]]
    result = {"points": points, "selected": None, "spread": math.nan, "within": 0, "n_complete": len(complete)}
    if not complete:
        return result
    best = (max if higher else min)(complete, key=lambda p: p["mean"])  # first on ties
    means = [p["mean"] for p in complete]
    ci = best["ci"] if math.isfinite(best["ci"]) else 0.0
    within = sum(abs(m - best["mean"]) <= ci for m in means)
    return result | {"selected": best, "spread": max(means) - min(means), "within": within}


def _figure(arm: str, curve: dict, knobs: list[str], val_key: str, plots: Path) -> figures.Plot | None:
    """Mean validation against the arm's first numeric knob, one line per value of its other knobs."""
    points = [p for p in curve["points"] if p["n"]]
    varying = [k for k in knobs if len({str(p["params"].get(k)) for p in points}) > 1]
    numeric = [k for k in varying if all(is_number(str(p["params"].get(k))) for p in points)]
    if not numeric or len(points) < 2:
        return None
    # on x: the knob with the most values (the arm's own, e.g. α, before a shared target.lr on ties)
    x_key = max(numeric, key=lambda k: (len({str(p["params"].get(k)) for p in points}), not k.startswith("target.")))
    others = [k for k in varying if k != x_key]
    series: dict[str, list] = {}
    for p in points:
        name = " ".join(f"{k}={p['params'].get(k)}" for k in others) or val_key
        series.setdefault(name, []).append({"x": float(p["params"][x_key]), **p})
    plot = figures.numeric(series, val_key, x_key, save_to=plots / f"tuning_{slug(arm)}_{slug(val_key)}")
    plot.caption = f"{arm}: {plot.caption[:1].lower()}{plot.caption[1:]} Selection seeds only."
    return plot


def tuning_section(runs: list[dict], plots: Path, out_dir: Path, baseline: str | None = None,
                   seeds_spec: str | None = AUTO, tune_keys: list[str] | None = None,
                   metrics: list[str] | None = None) -> list[str]:
    arms, knobs = arms_and_grids(runs, tune_keys)
    m = primary(runs)
    val_key, head = f"target/val_{m}", f"target/test_{m}"
    higher = higher_is_better(runs)
    sel_seeds, test_seeds, how = split_seeds(arms, seeds_spec)
    curves = {arm: select(grid, sel_seeds, val_key, higher) for arm, grid in arms.items()}
    lines = ["## Tuned per arm, then compared", "",
             f"Each arm's setting is selected on its **mean {val_key} over the selection seeds** "
             f"({'higher' if higher else 'lower'} is better; the test split is not looked at), among its grid points "
             f"that have a completed run for every selection seed; knobs: {', '.join(f'`{k}`' for k in knobs)}. "
             + how, ""]
    lines += [row(["arm", "grid points (complete)", "selected setting", f"mean {val_key} (95% CI, n)",
                   "val spread across grid", "points within the selected's CI"]),
              row(["---", "---:", "---", "---:", "---:", "---:"])]
    no_setting = []
    for arm, curve in curves.items():
        chosen = curve["selected"]
        if chosen is None:
            no_setting.append(arm)
            lines.append(row([arm, f"{len(curve['points'])} (0)", "**none complete**", NO_VALUE, NO_VALUE, NO_VALUE]))
            continue
        flat = (f"{fmt(curve['spread'])}" + (" (one point)" if curve["n_complete"] == 1 else ""))
        lines.append(row([arm, f"{len(curve['points'])} ({curve['n_complete']})", f"`{chosen['grid']}`",
                          f"{mean_ci_text(chosen)} (n={chosen['n']})", flat,
                          f"{curve['within']}/{curve['n_complete']}"]))
    if no_setting:
        lines += ["", "No completed setting (no grid point has a completed run with a validation value for every "
                      f"selection seed), left out of the comparison: {', '.join(f'`{a}`' for a in no_setting)}."]
    lines += ["", "Validation curves (selection seeds; * = selected; incomplete points list their missing seeds):", "",
              row(["arm", "grid point", f"mean {val_key} ± 95% CI", "n", "missing selection seeds"]),
              row(["---", "---", "---:", "---:", "---"])]
    for arm, curve in curves.items():
        for p in curve["points"]:
            star = " *" if curve["selected"] is p else ""
            lines.append(row([arm, f"{p['grid']}{star}", mean_ci_text(p), str(p["n"]), _seeds(p["missing"]) if p["missing"] else ""]))
    figure_part: list[str] = []
    tuned = [(arm, c) for arm, c in curves.items() if len(c["points"]) > 1]
    for arm, curve in tuned[:LISTED_FIGURES]:
        plot = _figure(arm, curve, knobs, val_key, plots)
        if plot is not None:
            figure_part += ["", plot.markdown(out_dir), ""]
    selected = {arm: c["selected"]["grid"] for arm, c in curves.items() if c["selected"] is not None}
    lines += [""] + comparison(runs, arms, selected, test_seeds, baseline,
                               compared_metrics(runs) if metrics is None else metrics)
    return lines + figure_part


def choose_baseline_arm(arms: list[str], baseline: str | None) -> tuple[str | None, str]:
    if not arms:
        return None, ""
    if baseline is not None:
        if baseline in arms:
            return baseline, ""
        found = [a for a in arms if a.split("=")[-1] == baseline.split("=")[-1]]
        if found:
            return found[0], ""
        return arms[0], f"`{baseline}` is not an arm with a selected setting; comparing against `{arms[0]}`. "
    for arm in arms:
        if arm.split("=")[-1] == "none":
            return arm, ""
    return arms[0], ""


def comparison(runs: list[dict], arms: dict, selected: dict[str, str], test_seeds: list, baseline: str | None,
               metrics: list[str]) -> list[str]:
    """Each arm's selected setting on the comparison seeds: mean ± CI and the paired comparison
    against the baseline arm, per metric (Holm across arms within a metric)."""
    wanted = set(test_seeds)
    chosen_runs = {arm: [r for r in arms[arm][label] if r["status"] == "completed" and r["config"].get("seed") in wanted]
                   for arm, label in selected.items()}
    base, note = choose_baseline_arm(list(chosen_runs), baseline)
    lines = [f"Comparison of the selected settings on the comparison seeds ({_seeds(test_seeds)}), against "
             f"`{base}`: {note}mean ± 95% CI; Δ: paired by seed, 95% CI; paired t-test and Wilcoxon p, Holm-corrected "
             "across the arms within each metric; **win** / **loss**: Holm-adjusted t p < 0.05 in the metric's "
             "better direction."]
    if base is None:
        return lines + ["", "No arm has a selected setting: nothing to compare."]
    for metric in metrics:
        higher = metric_direction(metric, runs)
        per_seed = {arm: {r["config"].get("seed"): r["metrics"].get(metric) for r in members}
                    for arm, members in chosen_runs.items()}
        if not any(v is not None for seeds in per_seed.values() for v in seeds.values()):
            continue
        rows = stats.compare_to_baseline(per_seed, base) if any(v is not None for v in per_seed[base].values()) else {}
        lines += ["", f"**{metric}** ({'higher' if higher else 'lower'} is better)", "",
                  row(["arm", "selected setting", "n", metric, f"Δ vs {base} (95% CI)", "t p (Holm)",
                       "Wilcoxon p (Holm)", "verdict"]),
                  row(["---", "---", "---:", "---:", "---:", "---:", "---:", "---"])]
        for arm, members in chosen_runs.items():
            summary = stats.mean_ci([r["metrics"].get(metric) for r in members])
            r = rows.get(arm)
            if r is None or r["n"] == 0:
                cells = [NO_VALUE if arm != base else "(baseline)", NO_VALUE, NO_VALUE, NO_VALUE]
            else:
                interval = (f"{r['mean_diff']:+.4f}" if r["n"] < 2 else
                            f"{r['mean_diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]")
                mark = stats.significance_mark(r, higher_is_better=higher)
                cells = [interval, p_text(r["t_p"], r["t_p_holm"]), p_text(r["wilcoxon_p"], r["wilcoxon_p_holm"]),
                         f"**{mark}**" if mark != "ns" else "ns"]
            lines.append(row([arm, f"`{selected[arm]}`", str(summary["n"]), mean_ci_text(summary), *cells]))
    return lines
