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

The package, by concern: runs.py (finding and reading the runs, their settings, one run's
headline metric), pairing.py (the transfer gain's scratch pairing), summary.py (the statistics per
setting), markdown.py (report.md's text), tables.py (report.csv and report.tex), plots.py (the
figures); here, `write_report` and the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transferlab import aggregate, figures, front, tuning
from transferlab.errors import TransferlabError
from transferlab.evidence import evidence_sections, primary_metric
from transferlab.report.markdown import (LISTED_UNPAIRED, PAIRING_RULE, best_setting_line, cell_text,
                                         failed_section, legend, markdown_report, markdown_table,
                                         pairing_section, unpaired_reasons)
from transferlab.report.pairing import (FIRST, NO_DATA, NO_SEED, PLAIN, SAME_RECIPE, SOURCE_DATA_KEYS, add_gains,
                                        is_plain_baseline, pairing_key, recipe_key)
from transferlab.report.plots import plot_metrics_by_key, plot_tradeoff
from transferlab.report.runs import (ALL_RUNS, assign_settings, canonical, config_settings, find_run_dirs, flatten,
                                     headline, headline_metric, higher_is_better, is_completed, is_swept, load_run,
                                     load_runs, override_key, override_settings, override_value, read_overrides,
                                     show, sign, source_mode, target_class, with_display_names)
from transferlab.report.summary import (METRICS, NEGATIVE, STATUSES, metric_names, summarize_setting,
                                        summarize_settings, sweep_metrics, swept_keys)
from transferlab.report.tables import csv_number, latex_table, tex_cell, tex_escape, tex_name, write_csv
from transferlab.results import RESULTS_FILE

# The functions and constants report.py had as one module (less summarize, markdown_row and plain_yaml_list:
# stats.mean_ci, evidence.row and yaml now), so `report.X` and `from transferlab.report import X` keep working.
__all__ = [
    "ALL_RUNS", "FIRST", "LISTED_UNPAIRED", "METRICS", "NEGATIVE", "NO_DATA", "NO_SEED", "PAIRING_RULE",
    "PLAIN", "SAME_RECIPE", "SOURCE_DATA_KEYS", "STATUSES", "add_gains", "assign_settings",
    "best_setting_line", "canonical", "cell_text", "config_settings", "csv_number", "failed_section",
    "find_run_dirs", "flatten", "headline", "headline_metric", "higher_is_better", "is_completed",
    "is_plain_baseline", "is_swept", "latex_table", "legend", "load_run", "load_runs", "main",
    "markdown_report", "markdown_table", "metric_names", "override_key", "override_settings",
    "override_value", "pairing_key", "pairing_section", "plot_metrics_by_key", "plot_tradeoff",
    "primary_metric", "read_overrides", "recipe_key", "show", "sign", "source_mode", "summarize_setting",
    "summarize_settings", "sweep_metrics", "swept_keys", "target_class", "tex_cell", "tex_escape", "tex_name",
    "unpaired_reasons", "with_display_names", "write_csv", "write_report",
]


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, baseline: str | None = None,
                 metrics: list[str] | None = None, tune: bool | None = None, selection_seeds: str | None = None,
                 tune_keys: list[str] | None = None, front_reference: tuple[float, float] | None = None,
                 task_keys: list[str] | None = None, runs: list[dict] | None = None) -> dict[str, Path]:
    """Write report.md (the table, pairing, failures, then the evidence sections: stability,
    efficiency, generalization, paired comparisons against `baseline` — of `metrics`, default
    every reported one: the headline, OOD, source after, forgetting —, the source task per seed,
    transferability), report.csv, report.tex and plots/*.{pdf,png}; return {name relative to out: path}.
    `runs`: load_runs(sweep_dir) when the caller has read them already (each results.json is read
    once); every section works from these."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise TransferlabError(f"no such directory: {sweep_dir}")
    runs = load_runs(sweep_dir) if runs is None else runs
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
    runs = load_runs(args.sweep_dir) if args.sweep_dir.is_dir() else None
    if runs and all(str(run["error"]).startswith("unreadable ") for run in runs):  # nothing but failures to read
        print(f"transferlab report: error: none of the {len(runs)} {RESULTS_FILE} under {args.sweep_dir} "
              f"can be read (e.g. {min(run['dir'] / RESULTS_FILE for run in runs)}): nothing to report",
              file=sys.stderr)
        return 2
    try:
        written = write_report(args.sweep_dir, args.out, args.baseline, args.metric, tune=args.tune,
                               selection_seeds=args.selection_seeds, tune_keys=args.tune_key,
                               front_reference=reference, task_keys=args.task_key, runs=runs)
    except TransferlabError as e:
        print(f"transferlab report: error: {e}", file=sys.stderr)
        return 2
    print(written["report.md"].read_text(), end="")
    print(f"transferlab report: wrote {len(written)} files to {written['report.md'].parent}", file=sys.stderr)
    return 0

