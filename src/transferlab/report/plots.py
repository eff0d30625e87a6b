"""The report's own figures (plots/*.pdf + .png, through figures.py): each metric against each
swept key, and forgetting against the headline target metric."""

from __future__ import annotations

from pathlib import Path

from transferlab import figures
from transferlab.evidence import NO_VALUE, is_number, slug
from transferlab.report.summary import metric_names, swept_keys


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
        # categorical x: numbers by value (α = 0.001, 0.01, 0.1, 1), then the rest as they came
        order = {v: i for i, v in enumerate(sorted(values, key=lambda v: (0, float(v), 0) if is_number(v)
                                                   else (1, 0.0, values.index(v))))}
        for metric in metric_names(rows):
            members = [row for row in rows if row[metric]["n"] > 0]
            if not members:
                continue
            # a preset's group path goes, as in the setting names (runs.with_display_names)
            group = lambda row: " ".join(f"{k.rsplit('/', 1)[-1]}={row['params'].get(k, NO_VALUE)}"  # noqa: E731
                                         for k in others) or None
            if numeric:
                series: dict[str, list] = {}
                for row in members:
                    series.setdefault(group(row) or metric, []).append(
                        {"x": float(row["params"].get(key)), **row[metric]})
                plot = figures.numeric(series, metric, key, save_to=plot_dir / f"{slug(metric)}_vs_{slug(key)}")
            else:
                members = sorted(members, key=lambda row: order[row["params"].get(key, NO_VALUE)])
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

