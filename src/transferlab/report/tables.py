"""report.csv (one row per setting: counts and mean/std/ci/n of each metric, full precision) and
report.tex (a booktabs tabular, mean $\\pm$ CI)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from transferlab.report.summary import NEGATIVE, STATUSES, metric_names, swept_keys


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

