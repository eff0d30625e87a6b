"""Aggregates across target tasks (issue 26 item 3; Agarwal et al., NeurIPS 2021).

When the sweep spans several target tasks — a swept `data=` option or `experiment=` (TASK_KEYS), or
any key given with `--task-key` — each method (the setting minus the task key) gets, over all its
runs on all tasks:
- **normalized scores**: per task, (score − floor) / (ideal − floor), so 0 is the task's floor and
  1 its ideal, higher always better: floor = the task's majority-class (chance) level,
  results.json `task.majority_test`; ideal = 1 (accuracy and F1: 1.0; perplexity: 1.0). A task
  without a known floor is min–max normalized over its runs (worst run 0, best 1; said per task);
- **IQM** (the mean of the middle 50% of runs, pooled over tasks) and the **mean**, each with a
  95% **stratified bootstrap** percentile interval (runs redrawn within each task);
- the **probability of improvement** P(method > baseline): per task the probability that a run of
  the method beats a run of the baseline (Mann–Whitney U / NM, ties ½), averaged over tasks, with a
  stratified bootstrap interval; baseline: `--baseline` (a method), default the one named `none`,
  else the first;
- **performance profiles**: the fraction of runs whose normalized score exceeds τ, each task
  weighted equally, with bootstrap bands.
The statistics are `stats.iqm`, `aggregate_interval`, `probability_of_improvement`,
`performance_profile` (numpy/scipy; the `rliable` package is not a dependency).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from transferlab import figures, stats
from transferlab.evidence import NO_VALUE, higher_is_better, primary, row, slug
from transferlab.tuning import arm_label

TASK_KEYS = ("data", "experiment")
BOOTSTRAP_REPS = 2000
IDEAL = 1.0


def task_keys(runs: list[dict], given: list[str] | None = None) -> list[str]:
    keys = list(dict.fromkeys(k for r in runs for k in r.get("params", {})))
    if given:
        return [k for k in keys if k in given]
    return [k for k in keys if k.rsplit("/", 1)[-1] in TASK_KEYS]


def normalizer(members: list[dict], key: str, higher: bool) -> tuple[float, float, str]:
    """(floor, ideal, how) for one task's runs."""
    floors = {(r.get("task") or {}).get("majority_test") for r in members} - {None}
    if len(floors) == 1:
        return float(next(iter(floors))), IDEAL, "chance"
    scores = [r["metrics"][key] for r in members if r["metrics"].get(key) is not None]
    worst, best = (min(scores), max(scores)) if higher else (max(scores), min(scores))
    return worst, best, "min–max over its runs"


def normalize(score: float, floor: float, ideal: float) -> float:
    return (score - floor) / (ideal - floor) if ideal != floor else math.nan


def aggregate_section(runs: list[dict], plots: Path, out_dir: Path, baseline: str | None = None,
                      given_task_keys: list[str] | None = None, reps: int = BOOTSTRAP_REPS) -> list[str]:
    completed = [r for r in runs if r["status"] == "completed"]
    tkeys = task_keys(completed, given_task_keys)
    if not tkeys:
        return []
    key = f"target/test_{primary(completed)}"
    higher = higher_is_better(completed)
    all_keys = list(dict.fromkeys(k for r in completed for k in r.get("params", {})))
    method_keys = [k for k in all_keys if k not in tkeys]
    by_task: dict[str, list[dict]] = {}
    for r in completed:
        if r["metrics"].get(key) is not None:
            by_task.setdefault(" ".join(f"{k}={r['params'].get(k)}" for k in tkeys), []).append(r)
    if len(by_task) < 2:
        return []
    tasks = list(by_task)
    scores: dict[str, list[np.ndarray]] = {}
    task_lines = []
    for t, (task, members) in enumerate(by_task.items()):
        floor, ideal, how = normalizer(members, key, higher)
        task_lines.append(row([task, str(len(members)), f"{floor:.4g}", f"{ideal:.4g}", how]))
        for r in members:
            method = arm_label(r["params"], method_keys) if method_keys else "(all runs)"
            scores.setdefault(method, [[] for _ in tasks])[t].append(normalize(r["metrics"][key], floor, ideal))
    scores = {m: [np.asarray(s, dtype=float) for s in per_task] for m, per_task in scores.items()}
    methods = list(scores)
    base = baseline if baseline in methods else next((m for m in methods if m.split("=")[-1] == "none"), methods[0])
    lines = ["## Aggregates across tasks", "",
             f"{len(tasks)} target tasks (`{'`, `'.join(tkeys)}`), {key} normalized per task to (score − floor) / "
             "(ideal − floor): 0 = the task's floor, 1 = its ideal, higher is better. IQM: the mean of the middle 50% "
             "of runs pooled over tasks; intervals: 95% stratified bootstrap (runs redrawn within each task, "
             f"{reps} draws); P(> {base}): the probability that a run of the method beats a run of `{base}` on a "
             "task drawn at random, averaged over tasks (Agarwal et al., NeurIPS 2021).", "",
             row(["task", "runs", "floor", "ideal", "normalization"]), row(["---", "---:", "---:", "---:", "---"]),
             *task_lines, "",
             row(["method", "tasks", "runs", "IQM (95% CI)", "mean (95% CI)", f"P(> {base}) (95% CI)"]),
             row(["---", "---:", "---:", "---:", "---:", "---:"])]
    summary_rows, curves = [], {}
    pooled = np.concatenate([s for per_task in scores.values() for s in per_task if len(s)])
    taus = np.linspace(min(0.0, float(np.nanmin(pooled))), max(1.0, float(np.nanmax(pooled))), 101)
    for method, per_task in scores.items():
        i = stats.aggregate_interval(per_task, "iqm", reps=reps)
        m = stats.aggregate_interval(per_task, "mean", reps=reps)
        if method == base:
            poi_text = "(baseline)"
        else:
            p = stats.probability_of_improvement(per_task, scores[base], reps=reps)
            poi_text = NO_VALUE if math.isnan(p["value"]) else _interval(p)
        lines.append(row([method, str(i["n_tasks"]), str(i["n_runs"]), _interval(i), _interval(m), poi_text]))
        summary_rows.append({"label": method, "IQM": i, "mean": m})
        curves[method] = stats.performance_profile(per_task, taus, reps=reps)
    missing = [m for m, per_task in scores.items() if any(len(s) == 0 for s in per_task)]
    if missing:
        lines += ["", f"Not run on every task (aggregated over the tasks they have): {', '.join(f'`{m}`' for m in missing)}."]
    lines += ["", figures.intervals(summary_rows, ["IQM", "mean"], "normalized score",
                                    save_to=plots / f"aggregate_{slug(key)}").markdown(out_dir), "",
              figures.profiles(curves, "normalized score", save_to=plots / f"profiles_{slug(key)}").markdown(out_dir), ""]
    return lines


def _interval(s: dict) -> str:
    if math.isnan(s["value"]):
        return NO_VALUE
    return f"{s['value']:.3f}" if math.isnan(s["low"]) else f"{s['value']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"
