"""report.md's own text: the results table and its legend, the best setting, how runs were paired,
and the jobs that did not complete (the evidence sections come from evidence.py and the others)."""

from __future__ import annotations

from pathlib import Path

from transferlab.evidence import mean_ci_text
from transferlab.evidence import row as markdown_row
from transferlab.report.pairing import FIRST, NO_SEED, PLAIN, SAME_RECIPE
from transferlab.report.runs import headline_metric, higher_is_better, is_completed, source_mode
from transferlab.report.summary import NEGATIVE, STATUSES, metric_names

LISTED_UNPAIRED = 10  # job names listed in the legend; per setting, the Pairing section says why


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


def cell_text(summary: dict, n_completed: int) -> str:
    """"0.9389 ± 0.0123"; one value: "0.9389"; none: "—"; "(n=3)" when fewer values than runs."""
    text = mean_ci_text(summary)
    return text if summary["n"] in (0, n_completed) else f"{text} (n={summary['n']})"


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

