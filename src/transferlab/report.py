"""Ablation report: a sweep directory in, the table a paper needs out.

`transferlab report <sweep_dir> [--out DIR]` (or `write_report`) reads every `results.json` under
the sweep directory (any depth) and groups the runs into *settings*: the swept overrides minus the
seed (from each job's `.hydra/overrides.yaml`, dropping `seed=…` and overrides every job shares),
or, when a run has no overrides file, the config keys whose values differ across runs (minus
`seed`, keys that equal the seed in every run, such as `regularizer.seed`, and `name`).

Per setting it reports the number of completed runs, the completed/failed/running counts, and for
target/test_acc, target/val_acc, transfer/forgetting and transfer/gain the mean, the standard
deviation (ddof=1) and the 95% confidence half-width t(0.975, n−1)·std/√n over completed runs.
Null metrics (the forgetting of a scratch run) are skipped, not counted as 0; with one value the
std and CI are NaN (blank), never 0.

Transfer gain pairs each completed transfer run (source.mode train or checkpoint) with a completed
scratch run (source.mode scratch) of the same target data (config.data without its source_* keys), the same backbone config, the same label budget (data.target_train_size) and
the same seed. Among several matches it prefers the scratch run with identical target, freeze and
regularizer configs, then the plain baseline (FullFinetune, NoRegularizer), then the first in
directory order. gain = target/test_acc(run) − target/test_acc(scratch). A transfer run with no
match has no gain; the report counts and lists these runs. A setting whose mean gain + CI < 0 (the
whole 95% interval below zero) is marked "negative transfer".

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
import re
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from transferlab.errors import TransferlabError
from transferlab.results import RESULTS_FILE

METRICS = ["target/test_acc", "target/val_acc", "transfer/forgetting", "transfer/gain"]
STATUSES = ["completed", "failed", "running", "interrupted"]
NEGATIVE = "negative transfer"
ALL_RUNS = "(all runs)"  # the label of the one setting of a sweep that varied only the seed
NO_VALUE = "—"
MISSING = object()  # a config key a run does not have
MARKERS = "osD^vP*Xh<>p"  # one per setting in the trade-off plot


# ---------------------------------------------------------------------------------------------
# Loading


def load_runs(sweep_dir: str | Path) -> list[dict]:
    """Every results.json under sweep_dir, in natural directory order (2 before 10).

    Each run: {"dir": Path, "name": dir relative to sweep_dir, "status", "error", "metrics",
    "config", "overrides": the job's override strings, or None without .hydra/overrides.yaml}.
    An unreadable results.json is a failed run whose error says so.
    """
    root = Path(sweep_dir)
    paths = sorted(root.rglob(RESULTS_FILE), key=lambda p: natural_key(p.parent.relative_to(root)))
    return [load_run(path, root) for path in paths]


def load_run(path: Path, root: Path) -> dict:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        results = {"status": "failed", "error": f"unreadable {RESULTS_FILE}: {e}"}
    return {
        "dir": path.parent,
        "name": path.parent.relative_to(root).as_posix(),
        "status": results.get("status"),
        "error": results.get("error"),
        "metrics": results.get("metrics") or {},
        "config": results.get("config") or {},
        "overrides": read_overrides(path.parent / ".hydra" / "overrides.yaml"),
    }


def read_overrides(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    try:
        overrides = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return None
    return [str(o) for o in overrides] if isinstance(overrides, list) else None


def natural_key(path: Path) -> list:
    """'job10' after 'job2': digit runs compare as numbers (str/int alternate, so they line up)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


# ---------------------------------------------------------------------------------------------
# Settings: what was swept, minus the seed


def assign_settings(runs: list[dict]) -> list[dict]:
    """Each run plus "setting" (its label) and "params" ({swept key: value string})."""
    if runs and all(run["overrides"] is not None for run in runs):
        labelled = override_settings([run["overrides"] for run in runs])
    else:
        labelled = config_settings([run["config"] for run in runs])
    return [run | {"setting": label or ALL_RUNS, "params": params} for run, (label, params) in zip(runs, labelled)]


def override_settings(overrides: list[list[str]]) -> list[tuple[str, dict]]:
    kept = [[o for o in job if override_key(o) != "seed"] for job in overrides]
    shared = set.intersection(*(set(job) for job in kept))
    kept = [[o for o in job if o not in shared] for job in kept]
    return [(" ".join(job), {override_key(o): override_value(o) for o in job}) for job in kept]


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


def add_gains(runs: list[dict]) -> list[dict]:
    """Each run plus "scratch" (its paired scratch run's name, or None) and, when paired,
    metrics["transfer/gain"]."""
    scratch = [run for run in runs if is_completed(run) and source_mode(run) == "scratch"
               and test_acc(run) is not None]
    paired = []
    for run in runs:
        match = None
        if is_completed(run) and source_mode(run) != "scratch" and test_acc(run) is not None:
            match = choose_scratch(run, [s for s in scratch if pairing_key(s) == pairing_key(run)])
        gain = {} if match is None else {"transfer/gain": test_acc(run) - test_acc(match)}
        paired.append(run | {"scratch": match and match["name"], "metrics": run["metrics"] | gain})
    return paired


def pairing_key(run: dict) -> str:
    """Same target data, backbone, label budget and seed."""
    config = run["config"]
    data = config.get("data") or {}
    target_data = {k: v for k, v in data.items() if k not in ("source_classes", "source_domains", "source_train_size", "source_dataset")}
    return canonical([target_data, config.get("backbone"), data.get("target_train_size"), config.get("seed")])


def choose_scratch(run: dict, candidates: list[dict]) -> dict | None:
    """Same target/freeze/regularizer recipe, else the plain baseline, else the first."""
    same_recipe = [s for s in candidates
                   if all(canonical(s["config"].get(k)) == canonical(run["config"].get(k))
                          for k in ("target", "freeze", "regularizer"))]
    plain = [s for s in candidates
             if target_class(s, "freeze").endswith("FullFinetune")
             and target_class(s, "regularizer").endswith("NoRegularizer")]
    for preferred in (same_recipe, plain, candidates):
        if preferred:
            return preferred[0]
    return None


def is_completed(run: dict) -> bool:
    return run["status"] == "completed"


def source_mode(run: dict) -> str | None:
    return (run["config"].get("source") or {}).get("mode")


def target_class(run: dict, group: str) -> str:
    return str((run["config"].get(group) or {}).get("_target_", ""))


def test_acc(run: dict) -> float | None:
    return run["metrics"].get("target/test_acc")


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
    settings = dict.fromkeys(run["setting"] for run in runs)
    return [summarize_setting(label, [run for run in runs if run["setting"] == label]) for label in settings]


def summarize_setting(label: str, runs: list[dict]) -> dict:
    completed = [run for run in runs if is_completed(run)]
    row = {"setting": label, "params": runs[0]["params"], "n": len(completed)}
    row |= {status: sum(run["status"] == status for run in runs) for status in STATUSES}
    row["unpaired"] = sum(source_mode(run) != "scratch" and run["scratch"] is None for run in completed)
    for metric in METRICS:
        row[metric] = summarize([run["metrics"][metric] for run in completed
                                 if run["metrics"].get(metric) is not None])
    gain = row["transfer/gain"]
    row["negative_transfer"] = bool(gain["mean"] + gain["ci"] < 0)  # False when the CI is NaN
    return row


def swept_keys(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row["params"]))


# ---------------------------------------------------------------------------------------------
# report.md


def markdown_report(rows: list[dict], runs: list[dict], sweep_dir: Path) -> str:
    return "\n".join([f"# Ablation report: {sweep_dir}", "", markdown_table(rows), "",
                      *legend(runs), "", *failed_section(runs)]) + "\n"


def markdown_table(rows: list[dict]) -> str:
    header = ["setting", "n", *METRICS, *STATUSES, ""]
    align = ["---", "---:", *["---:"] * len(METRICS), *["---:"] * len(STATUSES), "---"]
    lines = [markdown_row(header), markdown_row(align)]
    for row in rows:
        cells = [row["setting"], str(row["n"]), *(cell_text(row[m], row["n"]) for m in METRICS),
                 *(str(row[s]) for s in STATUSES), f"**{NEGATIVE}**" if row["negative_transfer"] else ""]
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


def legend(runs: list[dict]) -> list[str]:
    transfer = [r for r in runs if is_completed(r) and source_mode(r) != "scratch"]
    unpaired = [r["name"] for r in transfer if r["scratch"] is None]
    lines = ["n: completed runs. Cells: mean ± 95% CI half-width (t-distribution, n−1 d.o.f.) over "
             "completed runs; one value: no CI; —: no value (null metrics are skipped).",
             "transfer/gain: target/test_acc minus that of the scratch run with the same target data, "
             "backbone, label budget and seed. "
             f"{NEGATIVE}: mean gain + CI < 0. "
             f"{len(transfer) - len(unpaired)} transfer runs paired, {len(unpaired)} unpaired."]
    if unpaired:
        lines.append(f"Unpaired (no matching scratch run, no gain): {', '.join(unpaired)}.")
    return lines


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
    keys = swept_keys(rows)
    header = ["setting", *keys, *STATUSES, "unpaired", "negative_transfer"]
    header += [f"{metric}_{stat}" for metric in METRICS for stat in ("mean", "std", "ci", "n")]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            values = [row["setting"], *(row["params"].get(key, "") for key in keys),
                      *(row[s] for s in STATUSES), row["unpaired"], row["negative_transfer"]]
            values += [csv_number(row[metric][stat]) for metric in METRICS for stat in ("mean", "std", "ci", "n")]
            writer.writerow(values)
    return path


def csv_number(value: float | int) -> str:
    """Full precision (repr round-trips); NaN as a blank cell."""
    return "" if isinstance(value, float) and math.isnan(value) else repr(value)


# ---------------------------------------------------------------------------------------------
# report.tex


TEX_HEADER = ["Setting", "$n$", "Target test acc.", "Target val.\\ acc.", "Forgetting", "Transfer gain"]


def latex_table(rows: list[dict], sweep_dir: Path) -> str:
    lines = [f"% Ablation report: {sweep_dir}",
             "% mean $\\pm$ 95% CI half-width (t-distribution) over completed runs; needs \\usepackage{booktabs}",
             f"% $^\\dagger$: {NEGATIVE} (mean gain + CI < 0)",
             "\\begin{tabular}{lr" + "c" * len(METRICS) + "}",
             "\\toprule",
             " & ".join(TEX_HEADER) + " \\\\",
             "\\midrule"]
    for row in rows:
        cells = [tex_escape(row["setting"]), str(row["n"]), *(tex_cell(row[m]) for m in METRICS)]
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
    """For each swept key and metric: the metric against the key's values, one line per
    combination of the other swept keys, CI error bars. Metrics with no values are skipped."""
    keys = swept_keys(rows)
    written = []
    for key in keys:
        for metric in METRICS:
            if all(math.isnan(row[metric]["mean"]) for row in rows):
                continue
            fig = Figure(figsize=(6, 4))
            draw_metric_by_key(fig.add_subplot(), rows, key, [k for k in keys if k != key], metric)
            written.append(save(fig, plot_dir / f"{slug(metric)}_vs_{slug(key)}.png"))
    return written


def draw_metric_by_key(ax, rows: list[dict], key: str, others: list[str], metric: str) -> None:
    values = list(dict.fromkeys(row["params"].get(key, NO_VALUE) for row in rows))
    numeric = all(is_number(v) for v in values)
    ordered = sorted(values, key=float) if numeric else values
    position = {v: float(v) if numeric else i for i, v in enumerate(ordered)}  # value → x
    lines = dict.fromkeys(tuple(row["params"].get(k, NO_VALUE) for k in others) for row in rows)
    for combination in lines:
        members = [row for row in rows if row[metric]["n"] > 0
                   and tuple(row["params"].get(k, NO_VALUE) for k in others) == combination]
        members.sort(key=lambda row: position[row["params"].get(key, NO_VALUE)])
        if not members:
            continue
        label = wrap(" ".join(f"{k}={v}" for k, v in zip(others, combination))) or None
        ax.errorbar([position[row["params"].get(key, NO_VALUE)] for row in members],
                    [row[metric]["mean"] for row in members],
                    yerr=[no_nan(row[metric]["ci"]) for row in members],
                    marker="o", capsize=4, label=label)
    if numeric:
        positive = [p for p in position.values() if p > 0]
        if len(positive) == len(position) and max(positive) / min(positive) >= 100:
            ax.set_xscale("log")
    else:
        ax.set_xticks(list(position.values()), [wrap(v) for v in position])
        ax.set_xlim(-0.5, len(position) - 0.5)
    if metric in ("transfer/gain", "transfer/forgetting"):
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel(key)
    ax.set_ylabel(f"{metric} (mean ± 95% CI)")
    ax.set_title(f"{metric} by {key}")
    if others:
        ax.legend(fontsize="small")


def plot_tradeoff(rows: list[dict], plot_dir: Path) -> list[Path]:
    """Source forgetting (x) against target test accuracy (y), one labelled point per setting."""
    points = [row for row in rows if row["transfer/forgetting"]["n"] > 0 and row["target/test_acc"]["n"] > 0]
    if not points:
        return []
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for i, row in enumerate(points):  # a legend, not annotations: settings often share a point
        x, y = row["transfer/forgetting"], row["target/test_acc"]
        ax.errorbar([x["mean"]], [y["mean"]], xerr=[no_nan(x["ci"])], yerr=[no_nan(y["ci"])],
                    marker=MARKERS[i % len(MARKERS)], markersize=7, capsize=4, label=wrap(row["setting"]))
    ax.legend(fontsize="small")
    ax.set_xlabel("transfer/forgetting (mean ± 95% CI)")
    ax.set_ylabel("target/test_acc (mean ± 95% CI)")
    ax.set_title("Forgetting vs target accuracy")
    return [save(fig, plot_dir / "tradeoff_forgetting_vs_target_test_acc.png")]


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # very long labels: a cramped plot, not a warning per plot
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def no_nan(value: float) -> float:
    """Error-bar length: no interval (n=1) draws no bar."""
    return 0.0 if math.isnan(value) else value


def wrap(text: str, width: int = 40) -> str:
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


# ---------------------------------------------------------------------------------------------
# Entry points


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.md, report.csv, report.tex and plots/*.png; return {name relative to out: path}."""
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
    (out / "report.md").write_text(markdown_report(rows, runs, sweep_dir))
    write_csv(rows, out / "report.csv")
    (out / "report.tex").write_text(latex_table(rows, sweep_dir))
    written = {name: out / name for name in ("report.md", "report.csv", "report.tex")}
    for path in plot_metrics_by_key(rows, out / "plots") + plot_tradeoff(rows, out / "plots"):
        written[path.relative_to(out).as_posix()] = path
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="transferlab report",
        description="Ablation report of a sweep: report.md/.csv/.tex and plots/ (mean ± 95% CI per setting, "
                    "transfer gain against paired scratch runs, failed jobs).")
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory, e.g. outputs/multiruns/<name>/<time>")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep directory)")
    args = parser.parse_args(argv)
    found = sorted(args.sweep_dir.rglob(RESULTS_FILE)) if args.sweep_dir.is_dir() else []
    unreadable = [p for p in found if str(load_run(p, args.sweep_dir)["error"]).startswith("unreadable ")]
    if found and len(unreadable) == len(found):  # a report of nothing but failures to read: say so
        print(f"transferlab report: error: none of the {len(found)} {RESULTS_FILE} under {args.sweep_dir} "
              f"can be read (e.g. {found[0]}): nothing to report", file=sys.stderr)
        return 2
    try:
        written = write_report(args.sweep_dir, args.out)
    except TransferlabError as e:
        print(f"transferlab report: error: {e}", file=sys.stderr)
        return 2
    print(written["report.md"].read_text(), end="")
    print(f"transferlab report: wrote {len(written)} files to {written['report.md'].parent}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
