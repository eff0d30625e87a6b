"""Ablation report: a sweep directory in, the table a paper needs out.

Sections beyond the table (each its own module): tuning.py (each arm tuned on validation, then
compared: `--tune`, on by default when an arm's hyper-parameters vary), evidence.py (stability,
efficiency, generalization, paired comparisons, transferability), front.py (the stability–plasticity
front and hypervolumes) and aggregate.py (IQM, probability of improvement and performance profiles
across target tasks).

`transferlab report <sweep_dir> [--out DIR]` (or `write_report`) reads every `results.json` under
the sweep directory (any depth) and groups the runs into *settings*: the swept overrides minus the
seed (from each job's `.hydra/overrides.yaml`, dropping `seed=…` and overrides every job shares),
or, when a run has no overrides file, the config keys whose values differ across runs (minus
`seed`, keys that equal the seed in every run, such as `regularizer.seed`, and `name`).

Per setting it reports the number of completed runs, the completed/failed/running counts, and for
the headline metric target/test_<m> and target/val_<m>, transfer/forgetting and transfer/gain the
mean, the standard deviation (ddof=1) and the 95% confidence half-width t(0.975, n−1)·std/√n over
completed runs. <m> is the run's `task.primary_metric` in results.json (acc for classification, f1
— seqeval entity F1 — for token classification); runs recorded before results.json had a `task`
block count as acc. Null metrics (the forgetting of a scratch run) are skipped, not counted as 0;
with one value the std and CI are NaN (blank), never 0.

Pairing (transfer gain). A *transfer run* is a completed run with source.mode train or checkpoint;
a *scratch run* is a completed run with source.mode scratch that has a target/test_<m> value. A
transfer run's candidates are the scratch runs with the same primary metric, the same target data
(the whole `data` config minus source_classes, source_domains, source_train_size and
source_dataset; the label budget data.target_train_size is part of it), the same `backbone`
config and the same `seed`. Of the candidates, the first rule that finds one chooses:
  1. same recipe: every key under `target`, `freeze` and `regularizer` equal to the transfer run's;
  2. plain baseline: freeze FullFinetune and regularizer NoRegularizer;
  3. first match: the first candidate in natural directory order.
Within a rule the first in natural directory order wins. gain = target/test_<m>(run) −
target/test_<m>(scratch). A transfer run without candidates has no gain; the report says why per
setting ("no scratch run for seed 2", or "no scratch run with this target data, backbone and label
budget"). report.md's "Pairing" section gives, per setting, the scratch setting(s) used and the
rule that chose each, and flags a setting whose runs were paired with more than one scratch
setting (e.g. the same-recipe scratch run of one seed failed: that seed took the plain baseline).
A setting whose mean gain + CI < 0 (the whole 95% interval below zero) is marked "negative
transfer".

Scale: one pass over the runs (scratch runs are indexed once by their pairing key), each
results.json read once, and the walk does not descend into run directories (a directory holding a
results.json is a run; its checkpoints/, csv/ and wandb/ are not searched).

Written into the sweep directory (or `out_dir`): report.md (the table, then every failed job with
its error), report.csv (one row per setting: counts and mean/std/ci/n of each metric), report.tex
(a booktabs tabular, mean $\\pm$ CI), and plots/*.png: each metric against each swept key, one
line per combination of the other swept keys, with CI error bars; and forgetting against target
test accuracy, one labelled point per setting.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from transferlab import aggregate, figures, front, tuning
from transferlab.errors import TransferlabError
from transferlab.evidence import evidence_sections, is_number, slug
from transferlab.results import RESULTS_FILE, natural_key

METRICS = ["target/test_acc", "target/val_acc", "transfer/forgetting", "transfer/gain"]
STATUSES = ["completed", "failed", "running", "interrupted"]
NEGATIVE = "negative transfer"
ALL_RUNS = "(all runs)"  # the label of the one setting of a sweep that varied only the seed
NO_VALUE = "—"
MISSING = object()  # a config key a run does not have
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster per overrides.yaml
# A plain YAML scalar that is an override: key=value, no quote, flow or comment characters.
PLAIN_OVERRIDE = re.compile(r"[A-Za-z_+~][\w.+~/@-]*=[^'\"#{}\[\]&*!|>%@`:,]*[^'\"#{}\[\]&*!|>%@`:,\s]|[A-Za-z_+~][\w.+~/@-]*=")
LISTED_UNPAIRED = 10  # job names listed in the legend; per setting, the Pairing section says why


# ---------------------------------------------------------------------------------------------
# Loading


def load_runs(sweep_dir: str | Path) -> list[dict]:
    """Every results.json under sweep_dir, in natural directory order (2 before 10).

    Each run: {"dir": Path, "name": dir relative to sweep_dir, "status", "error", "metrics",
    "config", "task": results.json's task block ({} for older runs), "overrides": the job's override
    strings, or None without .hydra/overrides.yaml}.
    An unreadable results.json is a failed run whose error says so.
    """
    root = os.fspath(sweep_dir)
    return [load_run(root, name) for name in sorted(find_run_dirs(root), key=natural_key)]


def find_run_dirs(root: str) -> list[str]:
    """The directories under root holding a results.json, relative to root ("." for root itself).
    It does not look inside a run directory: a run's checkpoints/, csv/ and wandb/ are most of a
    sweep's directories. Plain strings: pathlib's parsing would cost as much as the reading."""
    found, pending = [], [""]
    while pending:
        rel = pending.pop()
        folder = os.path.join(root, rel) if rel else root
        if os.path.isfile(os.path.join(folder, RESULTS_FILE)):
            found.append(rel or ".")
            if rel:
                continue
        try:
            subdirs = [e.name for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        pending += [f"{rel}/{name}" if rel else name for name in subdirs]
    return found


def load_run(root: str, name: str) -> dict:
    folder = os.path.join(root, name) if name != "." else root
    try:
        with open(os.path.join(folder, RESULTS_FILE), "rb") as f:
            results = json.loads(f.read())
    except (OSError, ValueError) as e:
        results = {"status": "failed", "error": f"unreadable {RESULTS_FILE}: {e}"}
    return {
        "dir": Path(folder),
        "name": name,
        "status": results.get("status"),
        "error": results.get("error"),
        "metrics": results.get("metrics") or {},
        "config": results.get("config") or {},
        "task": results.get("task") or {},
        "overrides": read_overrides(os.path.join(folder, ".hydra", "overrides.yaml")),
    }


def read_overrides(path: str) -> list[str] | None:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    plain = plain_yaml_list(text)
    if plain is not None:
        return plain
    try:
        overrides = yaml.load(text, Loader=YAML_LOADER) or []
    except yaml.YAMLError:
        return None
    return [str(o) for o in overrides] if isinstance(overrides, list) else None


def plain_yaml_list(text: str) -> list[str] | None:
    """The items of a YAML list of plain key=value strings, as Hydra writes overrides.yaml
    ("- seed=0"), read without a YAML parser (libyaml costs ~0.2 ms a file); None for anything
    that needs one (quotes, flow collections, comments, anchors: then yaml reads it)."""
    items = []
    for line in text.splitlines():
        if not line.startswith("- "):
            return None
        item = line[2:].strip()
        if not PLAIN_OVERRIDE.fullmatch(item):
            return None
        items.append(item)
    return items


# ---------------------------------------------------------------------------------------------
# Settings: what was swept, minus the seed


def assign_settings(runs: list[dict]) -> list[dict]:
    """Each run plus "setting" (its label) and "params" ({swept key: value string})."""
    if runs and all(run["overrides"] is not None for run in runs):
        labelled = override_settings([run["overrides"] for run in runs])
    else:
        labelled = config_settings([run["config"] for run in runs])
    return [run | {"setting": label or ALL_RUNS, "params": params, "setting_overrides": full or ALL_RUNS}
            for run, (label, params, full) in zip(runs, with_display_names(labelled))]


def override_settings(overrides: list[list[str]]) -> list[tuple[str, dict]]:
    kept = [[o for o in job if override_key(o) != "seed"] for job in overrides]
    shared = set.intersection(*(set(job) for job in kept))
    kept = [[o for o in job if o not in shared] for job in kept]
    return [(" ".join(job), {override_key(o): override_value(o) for o in job}) for job in kept]


def with_display_names(labelled: list[tuple[str, dict]]) -> list[tuple[str, dict, str]]:
    """(name, params, the overrides as written) per run. A setting is shown by name in report.md,
    report.tex and every figure alike: a preset's group path goes (`+ablation/baselines=l2sp` →
    `l2sp` when it is the only swept key, else `baselines=l2sp`), and so do `+` / `~`; plain keys
    stay (`regularizer=l2sp`, `target.lr=0.01`). The overrides stay in report.csv's key columns,
    and `--baseline` takes either form. Names that would collide keep the overrides."""
    keys = list(dict.fromkeys(key for _, params in labelled for key in params))
    alone = len(keys) == 1

    def name(params: dict) -> str:
        parts = []
        for key, value in params.items():
            if "/" in key:
                parts.append(value if alone else f"{key.rsplit('/', 1)[1]}={value}")
            else:
                parts.append(f"{key}={value}")
        return " ".join(parts)

    names = [name(params) for _, params in labelled]
    by_name: dict[str, set[str]] = {}
    for shown, (full, _) in zip(names, labelled):
        by_name.setdefault(shown, set()).add(full)
    if any(len(fulls) > 1 for fulls in by_name.values()):
        names = [full for full, _ in labelled]
    return [(shown, params, full) for shown, (full, params) in zip(names, labelled)]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def override_value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def config_settings(configs: list[dict]) -> list[tuple[str, dict]]:
    flat = [flatten(config) for config in configs]
    known = [(leaves, config.get("seed")) for leaves, config in zip(flat, configs) if leaves]  # not unreadable
    keys = list(dict.fromkeys(key for leaves, _ in known for key in leaves))
    swept = [key for key in keys
             if is_swept(key, [leaves.get(key, MISSING) for leaves, _ in known], [seed for _, seed in known])]
    params = [{key: show(leaves[key]) for key in swept if key in leaves} for leaves in flat]
    return [(" ".join(f"{k}={v}" for k, v in p.items()), p) for p in params]


def is_swept(key: str, values: list, seeds: list) -> bool:
    """Differs across runs, and is not the seed: not `seed`, `name`, or a key that equals the
    seed in every run that has it (regularizer.seed, interpolated from seed, exists only for EWC)."""
    if key in ("seed", "name") or len({canonical(v) for v in values}) < 2:
        return False
    follows_seed = all(v == s and not isinstance(v, bool) for v, s in zip(values, seeds) if v is not MISSING)
    return not follows_seed


def flatten(node, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}; lists are leaves."""
    if not isinstance(node, dict):
        return {prefix: node}
    leaves = {}
    for key, value in node.items():
        leaves.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


def canonical(value) -> str:
    return "<missing>" if value is MISSING else json.dumps(value, sort_keys=True, default=str)


def show(value) -> str:
    """A config value as it would be written in an override: l2sp, 0.1, null, [0,1]."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)


# ---------------------------------------------------------------------------------------------
# Transfer gain: each transfer run against its own scratch baseline


SOURCE_DATA_KEYS = ("source_classes", "source_domains", "source_train_size", "source_dataset")
SAME_RECIPE, PLAIN, FIRST = "same recipe", "plain baseline", "first match"
NO_SEED = "no scratch run for seed"
NO_DATA = "no scratch run with this target data, backbone and label budget"


def add_gains(runs: list[dict]) -> list[dict]:
    """Each run plus "scratch" (its paired scratch run's name, or None), "scratch_setting",
    "pairing" (the rule that chose the scratch run, or why there is none; None for runs that are
    not completed transfer runs), "candidates" (how many scratch runs matched) and, when paired,
    metrics["transfer/gain"]. The rule is the module docstring's.

    Linear in the runs: the scratch runs are indexed once by pairing key (and by recipe within
    it), so each transfer run costs one key and three look-ups."""
    by_key: dict[str, list[dict]] = {}  # pairing key → its scratch runs, in directory order
    by_recipe: dict[tuple[str, str], dict] = {}  # (pairing key, recipe) → the first such scratch run
    plain: dict[str, dict] = {}  # pairing key → its first plain-baseline scratch run
    seedless: set[str] = set()  # pairing keys without the seed: tells "wrong seed" from "no such data"
    for run in runs:
        if is_completed(run) and source_mode(run) == "scratch" and headline(run) is not None:
            key = pairing_key(run)
            by_key.setdefault(key, []).append(run)
            by_recipe.setdefault((key, recipe_key(run)), run)
            if is_plain_baseline(run):
                plain.setdefault(key, run)
            seedless.add(pairing_key(run, with_seed=False))
    paired = []
    for run in runs:
        match, why, found = None, None, []
        if is_completed(run) and source_mode(run) != "scratch":
            key = pairing_key(run)
            found = by_key.get(key, []) if headline(run) is not None else []
            if found:
                match, why = by_recipe.get((key, recipe_key(run))), SAME_RECIPE
                if match is None:
                    match, why = plain.get(key), PLAIN
                if match is None:
                    match, why = found[0], FIRST
            elif headline(run) is None:
                why = f"no {headline_metric(run)} value"
            else:
                why = NO_SEED if pairing_key(run, with_seed=False) in seedless else NO_DATA
        # the improvement in the task's good direction: scratch − run for a lower-is-better metric
        gain = {} if match is None else {"transfer/gain": sign(run) * (headline(run) - headline(match))}
        paired.append(run | {"scratch": match and match["name"], "scratch_setting": match and match.get("setting"),
                             "pairing": why, "candidates": len(found), "metrics": run["metrics"] | gain})
    return paired


def pairing_key(run: dict, with_seed: bool = True) -> str:
    """Same primary metric, target data (label budget included), backbone and seed."""
    config = run["config"]
    target_data = {k: v for k, v in (config.get("data") or {}).items() if k not in SOURCE_DATA_KEYS}
    seed = config.get("seed") if with_seed else None
    return canonical([primary_metric(run), target_data, config.get("backbone"), seed])


def recipe_key(run: dict) -> str:
    """What "same recipe" compares: every key under target, freeze and regularizer."""
    return canonical([run["config"].get(group) for group in ("target", "freeze", "regularizer")])


def is_plain_baseline(run: dict) -> bool:
    return (target_class(run, "freeze").endswith("FullFinetune")
            and target_class(run, "regularizer").endswith("NoRegularizer"))


def is_completed(run: dict) -> bool:
    return run["status"] == "completed"


def source_mode(run: dict) -> str | None:
    return (run["config"].get("source") or {}).get("mode")


def target_class(run: dict, group: str) -> str:
    return str((run["config"].get(group) or {}).get("_target_", ""))


def primary_metric(run: dict) -> str:
    """The task's headline metric ("acc", "f1"): results.json's task.primary_metric; acc for runs
    recorded before results.json had a task block."""
    return str((run.get("task") or {}).get("primary_metric") or "acc")


def headline_metric(run: dict) -> str:
    return f"target/test_{primary_metric(run)}"


def headline(run: dict) -> float | None:
    return run["metrics"].get(headline_metric(run))


def higher_is_better(run: dict) -> bool:
    """results.json's task.higher_is_better (absent: true, as for accuracy and F1; false for a
    perplexity or a loss)."""
    return (run.get("task") or {}).get("higher_is_better") is not False


def sign(run: dict) -> float:
    """+1 where higher is better, −1 where lower is: sign · (a − b) > 0 means a is better."""
    return 1.0 if higher_is_better(run) else -1.0


def sweep_metrics(runs: list[dict]) -> list[str]:
    """The report's columns: test and val of each primary metric among the completed runs (acc
    when there are none), then forgetting and gain. For a classification sweep this is METRICS."""
    completed = [run for run in runs if is_completed(run)]
    primaries = dict.fromkeys(primary_metric(run) for run in completed) or {"acc": None}
    return [f"target/{split}_{m}" for m in primaries for split in ("test", "val")] + METRICS[2:]


def metric_names(rows: list[dict]) -> list[str]:
    return rows[0]["metric_names"] if rows else METRICS


# ---------------------------------------------------------------------------------------------
# Statistics per setting


def summarize(values: list[float]) -> dict:
    """n, mean, std (ddof=1) and the 95% t-interval half-width; std and ci are NaN for n < 2."""
    n = len(values)
    mean = float(np.mean(values)) if n else math.nan
    std = float(np.std(values, ddof=1)) if n > 1 else math.nan
    ci = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "ci": ci}


def summarize_settings(runs: list[dict]) -> list[dict]:
    """One row per setting, in order of first appearance: counts and a summary per metric."""
    settings: dict[str, list[dict]] = {}
    for run in runs:
        settings.setdefault(run["setting"], []).append(run)
    metrics = sweep_metrics(runs)
    return [summarize_setting(label, members, metrics) for label, members in settings.items()]


def summarize_setting(label: str, runs: list[dict], metrics: list[str] = METRICS) -> dict:
    completed = [run for run in runs if is_completed(run)]
    row = {"setting": label, "params": runs[0]["params"], "n": len(completed), "metric_names": metrics}
    row |= {status: sum(run["status"] == status for run in runs) for status in STATUSES}
    row["unpaired"] = sum(source_mode(run) != "scratch" and run["scratch"] is None for run in completed)
    for metric in metrics:
        row[metric] = summarize([run["metrics"][metric] for run in completed
                                 if run["metrics"].get(metric) is not None])
    gain = row["transfer/gain"]
    row["negative_transfer"] = bool(gain["mean"] + gain["ci"] < 0)  # False when the CI is NaN
    return row


def swept_keys(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row["params"]))


# ---------------------------------------------------------------------------------------------
# report.md


def markdown_report(rows: list[dict], runs: list[dict], sweep_dir: Path, sections: list[str] = ()) -> str:
    """The results table and its legend, then `sections` (the evidence and the figures), then how
    runs were paired and the jobs that did not complete."""
    return "\n".join([f"# Ablation report: {sweep_dir}", "", markdown_table(rows), "",
                      *legend(runs), *best_setting_line(rows, runs), *sections, "", *pairing_section(runs), "", *failed_section(runs)]) + "\n"


def markdown_table(rows: list[dict]) -> str:
    metrics = metric_names(rows)
    flagged = any(row["negative_transfer"] for row in rows)  # the flag's column only when some row has it
    header = ["setting", "n", *metrics, *STATUSES, *([NEGATIVE] if flagged else [])]
    align = ["---", "---:", *["---:"] * len(metrics), *["---:"] * len(STATUSES), *(["---"] if flagged else [])]
    lines = [markdown_row(header), markdown_row(align)]
    for row in rows:
        cells = [row["setting"], str(row["n"]), *(cell_text(row[m], row["n"]) for m in metrics),
                 *(str(row[s]) for s in STATUSES)]
        if flagged:
            cells.append(f"**{NEGATIVE}**" if row["negative_transfer"] else "")
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def cell_text(summary: dict, n_completed: int) -> str:
    """"0.9389 ± 0.0123"; one value: "0.9389"; none: "—"; "(n=3)" when fewer values than runs."""
    if summary["n"] == 0:
        return NO_VALUE
    text = f"{summary['mean']:.4f}" if summary["n"] == 1 else f"{summary['mean']:.4f} ± {summary['ci']:.4f}"
    return text if summary["n"] == n_completed else f"{text} (n={summary['n']})"


def best_setting_line(rows: list[dict], runs: list[dict]) -> list[str]:
    """The setting with the best mean headline metric, in the task's direction."""
    completed = [r for r in runs if is_completed(r)]
    if not rows or not completed:
        return []
    head = metric_names(rows)[0]
    higher = higher_is_better(completed[0])
    scored = [row for row in rows if row[head]["n"] > 0]
    if len(scored) < 2:
        return []
    best = (max if higher else min)(scored, key=lambda row: row[head]["mean"])
    tied = [row["setting"] for row in scored if row[head]["mean"] == best[head]["mean"]]
    names = ", ".join(f"`{label}`" for label in tied) + (" (tied)" if len(tied) > 1 else "")
    return [f"Best mean {head} ({'higher' if higher else 'lower'} is better): {names} "
            f"({cell_text(best[head], best['n'])}); see the paired comparison for whether it is a win."]


def legend(runs: list[dict]) -> list[str]:
    transfer = [r for r in runs if is_completed(r) and source_mode(r) != "scratch"]
    unpaired = [r["name"] for r in transfer if r["scratch"] is None]
    headlines = " / ".join(dict.fromkeys(headline_metric(r) for r in transfer)) or "target/test_acc"
    lines = ["n: completed runs. Cells: mean ± 95% CI half-width (t-distribution, n−1 d.o.f.) over "
             "completed runs; one value: no CI; —: no value (null metrics are skipped).",
             f"transfer/gain: {headlines} minus that of the scratch run with the same target data, "
             "backbone, label budget and seed (which one, when several match: see Pairing)"
             + ("; for a lower-is-better metric (results.json task.higher_is_better: false) the scratch run's "
                "minus the run's, so a positive gain is always an improvement. "
                if any(not higher_is_better(r) for r in transfer) else ". ")
             +
             f"{NEGATIVE}: mean gain + CI < 0. "
             f"{len(transfer) - len(unpaired)} transfer runs paired, {len(unpaired)} unpaired."]
    if unpaired:
        listed = ", ".join(unpaired[:LISTED_UNPAIRED])
        more = (f" and {len(unpaired) - LISTED_UNPAIRED} more (why, per setting: see Pairing)"
                if len(unpaired) > LISTED_UNPAIRED else "")
        lines.append(f"Unpaired (no matching scratch run, no gain): {listed}{more}.")
    return lines


PAIRING_RULE = (
    "Each completed transfer run is paired with a completed scratch run (source.mode=scratch) of the "
    "same primary metric, target data (`data` minus its source_* keys; the label budget included), "
    "`backbone` config and `seed`. When several match, the first rule that finds one chooses: "
    f"**{SAME_RECIPE}** (every `target.*`, `freeze.*` and `regularizer.*` value equal), then "
    f"**{PLAIN}** (FullFinetune, NoRegularizer), then **{FIRST}** (first in directory order); "
    "within a rule, the first in directory order.")


def pairing_section(runs: list[dict]) -> list[str]:
    """Per setting with completed transfer runs: how many paired, with which scratch setting, by
    which rule (out of how many matching scratch runs), and why the others have no gain."""
    settings: dict[str, list[dict]] = {}
    for run in runs:
        if run.get("pairing") is not None:
            settings.setdefault(run["setting"], []).append(run)
    lines = ["## Pairing", "", PAIRING_RULE, ""]
    if not settings:
        return lines + ["No completed transfer runs."]
    for label, members in settings.items():  # a list, not a table: the main table's rows start "| setting"
        paired = [r for r in members if r["scratch"] is not None]
        uses: dict[tuple[str, str], int] = {}  # (scratch setting, rule) → runs, in order of first use
        for r in paired:
            uses[(str(r["scratch_setting"]), r["pairing"])] = uses.get((str(r["scratch_setting"]), r["pairing"]), 0) + 1
        line = f"- `{label}`: {len(paired)}/{len(members)} paired"
        if paired:
            line += ": " + ", ".join(f"×{n} with `{scratch}` ({rule})" for (scratch, rule), n in uses.items())
        counts = sorted({r["candidates"] for r in paired})
        if counts and counts[-1] > 1:
            span = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
            line += f"; {span} matching scratch runs each"
        if len({scratch for scratch, _ in uses}) > 1:
            line += "; **mixed scratch settings**: its gains compare against different baselines"
        reasons = unpaired_reasons(members)
        lines.append(line + (f"; unpaired: {reasons}" if reasons else ""))
    return lines


def unpaired_reasons(members: list[dict]) -> str:
    """"no scratch run for seed 2, 5; no target/test_f1 value (1 run)"."""
    reasons: dict[str, list[dict]] = {}
    for run in members:
        if run["scratch"] is None:
            reasons.setdefault(run["pairing"], []).append(run)
    parts = []
    for why, unpaired in reasons.items():
        if why == NO_SEED:
            seeds = sorted({r["config"].get("seed") for r in unpaired}, key=lambda s: (str(type(s)), s))
            parts.append(f"{why} {', '.join(map(str, seeds))}")
        else:
            parts.append(f"{why} ({len(unpaired)} run{'s' * (len(unpaired) > 1)})")
    return "; ".join(parts)


def failed_section(runs: list[dict]) -> list[str]:
    failed = [run for run in runs if run["status"] == "failed"]
    lines = ["## Failed jobs", ""]
    if not failed:
        lines.append("None.")
    else:
        lines += [markdown_row(["directory", "setting", "error"]), markdown_row(["---", "---", "---"])]
        lines += [markdown_row([r["name"], r["setting"], str(r["error"] or "(no error recorded)")]) for r in failed]
    running = [run["name"] for run in runs if run["status"] == "running"]
    if running:
        lines += ["", "## Running jobs (still running, or killed before they finished)", "",
                  ", ".join(running)]
    interrupted = [run["name"] for run in runs if run["status"] == "interrupted"]
    if interrupted:
        lines += ["", "## Interrupted jobs (SIGTERM; rerun the sweep command to resume them)", "",
                  ", ".join(interrupted)]
    return lines


# ---------------------------------------------------------------------------------------------
# report.csv


def write_csv(rows: list[dict], path: Path) -> Path:
    keys, metrics = swept_keys(rows), metric_names(rows)
    header = ["setting", *keys, *STATUSES, "unpaired", "negative_transfer"]
    header += [f"{metric}_{stat}" for metric in metrics for stat in ("mean", "std", "ci", "n")]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            values = [row["setting"], *(row["params"].get(key, "") for key in keys),
                      *(row[s] for s in STATUSES), row["unpaired"], row["negative_transfer"]]
            values += [csv_number(row[metric][stat]) for metric in metrics for stat in ("mean", "std", "ci", "n")]
            writer.writerow(values)
    return path


def csv_number(value: float | int) -> str:
    """Full precision (repr round-trips); NaN as a blank cell."""
    return "" if isinstance(value, float) and math.isnan(value) else repr(value)


# ---------------------------------------------------------------------------------------------
# report.tex


TEX_NAMES = {"transfer/forgetting": "Forgetting", "transfer/gain": "Transfer gain"}
TEX_SPLITS = {"test": "Target test", "val": "Target val.\\"}


def tex_name(metric: str) -> str:
    """target/test_acc → "Target test acc.", target/val_f1 → "Target val.\\ F1"."""
    if metric in TEX_NAMES:
        return TEX_NAMES[metric]
    split, name = metric.split("/", 1)[1].split("_", 1)
    return f"{TEX_SPLITS.get(split, split)} {'acc.' if name == 'acc' else tex_escape(name.upper())}"


def latex_table(rows: list[dict], sweep_dir: Path) -> str:
    metrics = metric_names(rows)
    lines = [f"% Ablation report: {sweep_dir}",
             "% mean $\\pm$ 95% CI half-width (t-distribution) over completed runs; needs \\usepackage{booktabs}",
             f"% $^\\dagger$: {NEGATIVE} (mean gain + CI < 0)",
             "\\begin{tabular}{lr" + "c" * len(metrics) + "}",
             "\\toprule",
             " & ".join(["Setting", "$n$", *map(tex_name, metrics)]) + " \\\\",
             "\\midrule"]
    for row in rows:
        cells = [tex_escape(row["setting"]), str(row["n"]), *(tex_cell(row[m]) for m in metrics)]
        if row["negative_transfer"]:
            cells[-1] += "$^\\dagger$"
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def tex_cell(summary: dict) -> str:
    if summary["n"] == 0:
        return "--"
    if summary["n"] == 1:
        return f"${summary['mean']:.4f}$"
    return f"${summary['mean']:.4f} \\pm {summary['ci']:.4f}$"


TEX_SPECIAL = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
               "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}


def tex_escape(text: str) -> str:
    return "".join(TEX_SPECIAL.get(char, char) for char in text)


# ---------------------------------------------------------------------------------------------
# Plots


def plot_metrics_by_key(rows: list[dict], plot_dir: Path) -> list[Path]:
    """For each swept key and metric: the metric against the key's values (figures.py: categorical
    values as points with error bars and no connecting lines, one group per combination of the
    other swept keys; numeric values as lines), PDF + PNG. Metrics with no values are skipped."""
    keys = swept_keys(rows)
    written = []
    for key in keys:
        others = [k for k in keys if k != key]
        values = list(dict.fromkeys(row["params"].get(key, NO_VALUE) for row in rows))
        numeric = all(is_number(v) for v in values)
        for metric in metric_names(rows):
            members = [row for row in rows if row[metric]["n"] > 0]
            if not members:
                continue
            group = lambda row: " ".join(f"{k}={row['params'].get(k, NO_VALUE)}" for k in others) or None  # noqa: E731
            if numeric:
                series: dict[str, list] = {}
                for row in members:
                    series.setdefault(group(row) or metric, []).append(
                        {"x": float(row["params"].get(key)), **row[metric]})
                plot = figures.numeric(series, metric, key, save_to=plot_dir / f"{slug(metric)}_vs_{slug(key)}")
            else:
                points = [{"label": str(row["params"].get(key, NO_VALUE)), "group": group(row), **row[metric]}
                          for row in members]
                plot = figures.categorical(points, metric, key, save_to=plot_dir / f"{slug(metric)}_vs_{slug(key)}")
            written += plot.files
    return written


def plot_tradeoff(rows: list[dict], plot_dir: Path) -> list[Path]:
    """Source forgetting (x) against the headline target metric (y), one labelled point per setting."""
    target = metric_names(rows)[0]  # target/test_acc, or target/test_f1 for a token-classification sweep
    points = [{"label": row["setting"], "x": row["transfer/forgetting"]["mean"], "xerr": row["transfer/forgetting"]["ci"],
               "y": row[target]["mean"], "yerr": row[target]["ci"], "n": row[target]["n"]}
              for row in rows if row["transfer/forgetting"]["n"] > 0 and row[target]["n"] > 0]
    if not points:
        return []
    return figures.scatter(points, "transfer/forgetting", target,
                           save_to=plot_dir / f"tradeoff_forgetting_vs_{slug(target)}").files


# ---------------------------------------------------------------------------------------------
# Entry points


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, baseline: str | None = None,
                 metrics: list[str] | None = None, tune: bool | None = None, selection_seeds: str | None = None,
                 tune_keys: list[str] | None = None, front_reference: tuple[float, float] | None = None,
                 task_keys: list[str] | None = None) -> dict[str, Path]:
    """Write report.md (the table, pairing, failures, then the evidence sections: stability,
    efficiency, generalization, paired comparisons against `baseline` — of `metrics`, default
    every reported one: the headline, OOD, source after, forgetting —, the source task per seed,
    transferability), report.csv, report.tex and plots/*.{pdf,png}; return {name relative to out: path}."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise TransferlabError(f"no such directory: {sweep_dir}")
    runs = load_runs(sweep_dir)
    if not runs:
        raise TransferlabError(f"no {RESULTS_FILE} under {sweep_dir}")
    runs = add_gains(assign_settings(runs))
    rows = summarize_settings(runs)
    out = Path(out_dir) if out_dir is not None else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_metrics_by_key(rows, out / "plots") + plot_tradeoff(rows, out / "plots")
    figure_lines = ["", "## Figures", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots
                                              if p.suffix == ".png"]
    sections = []
    if tune or (tune is None and tuning.is_tuning_sweep(runs, tune_keys)):
        sections += [""] + tuning.tuning_section(runs, out / "plots", out, baseline, selection_seeds, tune_keys, metrics)
        baseline = None if baseline is None else _setting_or_none(runs, baseline)
    sections += evidence_sections(runs, out, baseline, metrics)
    for part in (front.front_section(runs, out / "plots", out, front_reference, tune_keys),
                 aggregate.aggregate_section(runs, out / "plots", out, baseline, task_keys)):
        sections += ([""] + part) if part else []
    (out / "report.md").write_text(markdown_report(rows, runs, sweep_dir, sections + figure_lines))
    write_csv(rows, out / "report.csv")
    (out / "report.tex").write_text(latex_table(rows, sweep_dir))
    written = {name: out / name for name in ("report.md", "report.csv", "report.tex")}
    for path in [*plots, *sorted((out / "plots").glob("*.*"))] if (out / "plots").is_dir() else plots:
        written[path.relative_to(out).as_posix()] = path
    return written


def _setting_or_none(runs: list[dict], baseline: str) -> str | None:
    """In a tuning report `--baseline` names an arm; the per-setting comparison then takes it only
    when it is also a setting (else its default baseline)."""
    names = {r["setting"] for r in runs} | {r.get("setting_overrides") for r in runs}
    return baseline if baseline in names else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="transferlab report",
        description="Ablation report of a sweep: report.md/.csv/.tex and plots/ (mean ± 95% CI per setting, "
                    "transfer gain against paired scratch runs, failed jobs).")
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory, e.g. outputs/multiruns/<name>/<time>")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep directory)")
    parser.add_argument("--baseline", default=None,
                        help="the setting the paired comparison is against (default: the arm named none, else the first)")
    parser.add_argument("--metric", action="append", default=None, metavar="KEY",
                        help="a metric the paired comparison covers (repeat for several; default: every reported "
                             "one — target test, OOD test, source after, forgetting)")
    parser.add_argument("--tune", action=argparse.BooleanOptionalAction, default=None,
                        help="tune each arm on validation, then compare the selected settings (default: on when an "
                             "arm's hyper-parameters vary within the sweep; see transferlab.tuning)")
    parser.add_argument("--selection-seeds", default=None, metavar="SEEDS",
                        help="seeds that select each arm's setting: auto (default), all (reuse every seed), or a "
                             "list such as 0-4 or 0,1,2 (the comparison uses the others)")
    parser.add_argument("--tune-key", action="append", default=None, metavar="KEY",
                        help="a swept key that is a hyper-parameter to tune (repeat; default: the swept keys under "
                             "target, regularizer, freeze, optimizer, scheduler)")
    parser.add_argument("--front-reference", default=None, metavar="X,Y",
                        help="the hypervolume reference point (retention, target metric), in the metrics' units "
                             "(default: the worst observed on each axis)")
    parser.add_argument("--task-key", action="append", default=None, metavar="KEY",
                        help="a swept key that names the target task, for the aggregates across tasks (repeat; "
                             "default: data, experiment)")
    parser.add_argument("--dpi", type=int, default=None,
                        help=f"PNG resolution of the figures (default {figures.DPI}; 300 for print)")
    args = parser.parse_args(argv)
    if args.dpi is not None:
        figures.DPI = args.dpi
    try:
        reference = front.parse_reference(args.front_reference)
    except ValueError:
        print(f"transferlab report: error: --front-reference {args.front_reference}: expected two numbers X,Y "
              "(retention, target metric)", file=sys.stderr)
        return 2
    found = sorted(args.sweep_dir.rglob(RESULTS_FILE)) if args.sweep_dir.is_dir() else []
    unreadable = [p for p in found if str(load_run(str(p.parent), ".")["error"]).startswith("unreadable ")]
    if found and len(unreadable) == len(found):  # a report of nothing but failures to read: say so
        print(f"transferlab report: error: none of the {len(found)} {RESULTS_FILE} under {args.sweep_dir} "
              f"can be read (e.g. {found[0]}): nothing to report", file=sys.stderr)
        return 2
    try:
        written = write_report(args.sweep_dir, args.out, args.baseline, args.metric, tune=args.tune,
                               selection_seeds=args.selection_seeds, tune_keys=args.tune_key,
                               front_reference=reference, task_keys=args.task_key)
    except TransferlabError as e:
        print(f"transferlab report: error: {e}", file=sys.stderr)
        return 2
    print(written["report.md"].read_text(), end="")
    print(f"transferlab report: wrote {len(written)} files to {written['report.md'].parent}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
