"""Statistics per setting: one row per setting, its status counts and, per reported metric, the
mean ± 95% CI over its completed runs (`stats.mean_ci`), plus the negative-transfer flag."""

from __future__ import annotations

from transferlab import stats
from transferlab.evidence import primary_metric
from transferlab.report.runs import is_completed, source_mode

METRICS = ["target/test_acc", "target/val_acc", "transfer/forgetting", "transfer/gain"]
STATUSES = ["completed", "failed", "running", "interrupted"]
NEGATIVE = "negative transfer"  # a setting whose mean gain + CI < 0


def sweep_metrics(runs: list[dict]) -> list[str]:
    """The report's columns: test and val of each primary metric among the completed runs (acc
    when there are none), then forgetting and gain. For a classification sweep this is METRICS."""
    completed = [run for run in runs if is_completed(run)]
    primaries = dict.fromkeys(primary_metric(run) for run in completed) or {"acc": None}
    return [f"target/{split}_{m}" for m in primaries for split in ("test", "val")] + METRICS[2:]


def summarize_settings(runs: list[dict]) -> list[dict]:
    """One row per setting, in order of first appearance: counts and a summary per metric."""
    settings: dict[str, list[dict]] = {}
    for run in runs:
        settings.setdefault(run["setting"], []).append(run)
    metrics = sweep_metrics(runs)
    return [summarize_setting(label, members, metrics) for label, members in settings.items()]


def summarize_setting(label: str, runs: list[dict], metrics: list[str] = METRICS) -> dict:
    """{"setting", "params", "n" (completed runs), "metric_names", a count per status, "unpaired"
    (completed transfer runs without a gain), per metric stats.mean_ci of its values (null metrics
    skipped; std and ci NaN for n < 2), "negative_transfer" (mean gain + CI < 0)}."""
    completed = [run for run in runs if is_completed(run)]
    row = {"setting": label, "params": runs[0]["params"], "n": len(completed), "metric_names": metrics}
    row |= {status: sum(run["status"] == status for run in runs) for status in STATUSES}
    row["unpaired"] = sum(source_mode(run) != "scratch" and run["scratch"] is None for run in completed)
    for metric in metrics:
        row[metric] = stats.mean_ci(run["metrics"].get(metric) for run in completed)
    gain = row["transfer/gain"]
    row["negative_transfer"] = bool(gain["mean"] + gain["ci"] < 0)  # False when the CI is NaN
    return row


def metric_names(rows: list[dict]) -> list[str]:
    return rows[0]["metric_names"] if rows else METRICS


def swept_keys(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row["params"]))
