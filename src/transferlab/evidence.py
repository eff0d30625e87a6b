"""The report's evidence sections — the three open problems of transfer and two comparisons:

- **Stability**: per setting, std, worst and best seed, and the failed-run rate (a run fails at or
  below its majority-class baseline, results.json `task.majority_test`).
- **Efficiency**: trainable / total parameters, stage wall times, target samples/s, peak memory;
  the headline metric against trainable parameters and against fit time.
- **Generalization**: in- vs out-of-distribution test (`target/ood_test_<metric>`), the gap paired
  within each run; the WiSE-FT curve (`wise_ft/<α>/…`) when runs recorded one.
- **Paired comparison** against a baseline setting (the arm whose swept value is `none`, else the
  first; `report.baseline` / `--baseline` to choose): the paired difference over seeds with its
  95% CI, paired t and Wilcoxon p-values, Holm-corrected across settings; wins and losses marked.
- **Transferability**: LogME / LEEP / NCE / H-score per setting, and across settings Kendall's τ
  and Spearman's ρ against the realized target metric and gain.

Each section function takes the report's runs (report.load_run dicts, with "setting", "metrics",
"config", "task") and the plots folder, and returns its report.md lines. Seeds are the trial seed
(`config.seed`); settings never pool different hyper-parameters (DomainBed #111): everything but
the seed that was swept is part of the setting.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from transferlab import figures, stats
from transferlab.errors import TransferlabError

NO_VALUE = "—"
SCORES = {"logme": "LogME", "leep": "LEEP", "nce": "NCE", "hscore": "H-score"}


def by_setting(runs: list[dict]) -> dict[str, list[dict]]:
    settings: dict[str, list[dict]] = {}
    for run in runs:
        if run["status"] == "completed":
            settings.setdefault(run["setting"], []).append(run)
    return settings


def primary(runs: list[dict]) -> str:
    names = list(dict.fromkeys(str((r.get("task") or {}).get("primary_metric") or "acc") for r in runs))
    return names[0] if names else "acc"


def values(runs: list[dict], key: str) -> list[float]:
    return [r["metrics"].get(key) for r in runs]


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NO_VALUE
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def mean_ci_text(summary: dict, digits: int = 4) -> str:
    if summary["n"] == 0:
        return NO_VALUE
    if summary["n"] == 1:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['ci']:.{digits}f}"


def row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def point(label: str, summary: dict, **extra) -> dict:
    return {"label": label, **summary, **extra}


def figure_lines(plot: figures.Plot, out_dir: Path) -> list[str]:
    return ["", plot.markdown(out_dir), ""]


# -- stability ------------------------------------------------------------------------------------
def stability_section(runs: list[dict], plots: Path, out_dir: Path) -> list[str]:
    settings = by_setting(runs)
    head = f"target/test_{primary(runs)}"
    lines = ["## Stability", "",
             f"Per setting over seeds: {head} mean ± 95% CI, its std, worst and best seed, and failed runs — "
             "at or below the majority-class baseline of the run's test split (Mosbach et al. 2021).", "",
             row(["setting", "n", f"{head}", "std", "worst (seed)", "best (seed)", "failed runs"]),
             row(["---", "---:", "---:", "---:", "---:", "---:", "---:"])]
    points, majorities = [], set()
    for label, members in settings.items():
        summary = stats.mean_ci(values(members, head))
        s = stats.stability(values(members, head), [(r.get("task") or {}).get("majority_test") for r in members],
                            [r["config"].get("seed") for r in members])
        majorities |= {(r.get("task") or {}).get("majority_test") for r in members}
        failed = NO_VALUE if not s["n_judged"] else f"{s['failed']}/{s['n_judged']} ({s['failed_rate']:.0%})"
        lines.append(row([label, str(summary["n"]), mean_ci_text(summary), fmt(s["std"]),
                          f"{fmt(s['worst'])} ({s['worst_seed']})" if s["n"] else NO_VALUE,
                          f"{fmt(s['best'])} ({s['best_seed']})" if s["n"] else NO_VALUE, failed]))
        if summary["n"]:
            points.append(point(label, summary))
    if points:
        reference = next(iter(majorities)) if len(majorities) == 1 and None not in majorities else None
        plot = figures.categorical(points, head, reference=reference, reference_label="majority-class baseline",
                                   save_to=plots / f"stability_{slug(head)}")
        lines += figure_lines(plot, out_dir)
    return lines


# -- efficiency -----------------------------------------------------------------------------------
EFFICIENCY = [("params/trainable", "trainable params", 0), ("params/total", "total params", 0),
              ("time/source_s", "source stage (s)", 1), ("time/target_fit_s", "target fit (s)", 1),
              ("efficiency/target_samples_per_s", "target samples/s", 1),
              ("efficiency/peak_rss_mb", "peak RSS (MB)", 0)]


def efficiency_section(runs: list[dict], plots: Path, out_dir: Path) -> list[str]:
    settings = by_setting(runs)
    head = f"target/test_{primary(runs)}"
    present = [(k, name, d) for k, name, d in EFFICIENCY if any(r["metrics"].get(k) is not None for r in runs)]
    lines = ["## Efficiency", "",
             "Per setting, the mean over seeds. Wall times and samples/s on a shared machine are upper bounds; "
             "a source stage taken from the stage cache costs ≈ 0 s (its cost is paid once per seed).", "",
             row(["setting", "n", *[name for _, name, _ in present], head]),
             row(["---", "---:", *["---:"] * len(present), "---:"])]
    by_params, by_time = [], []
    for label, members in settings.items():
        cells = []
        for key, _, digits in present:
            s = stats.mean_ci(values(members, key))
            cells.append(NO_VALUE if not s["n"] else (f"{s['mean']:,.0f}" if digits == 0 else f"{s['mean']:.{digits}f}"))
        h = stats.mean_ci(values(members, head))
        lines.append(row([label, str(h["n"]), *cells, mean_ci_text(h)]))
        trainable = stats.mean_ci(values(members, "params/trainable"))
        fit = stats.mean_ci(values(members, "time/target_fit_s"))
        if h["n"] and trainable["n"]:
            by_params.append({"label": label, "x": trainable["mean"], "y": h["mean"], "yerr": h["ci"], "n": h["n"]})
        if h["n"] and fit["n"]:
            by_time.append({"label": label, "x": fit["mean"], "xerr": fit["ci"], "y": h["mean"], "yerr": h["ci"],
                            "n": h["n"]})
    if len(by_params) > 1:
        lines += figure_lines(figures.scatter(by_params, "params/trainable", head,
                                              save_to=plots / f"{slug(head)}_vs_trainable_params"), out_dir)
    if len(by_time) > 1:
        lines += figure_lines(figures.scatter(by_time, "time/target_fit_s", head,
                                              save_to=plots / f"{slug(head)}_vs_fit_time"), out_dir)
    return lines


# -- generalization -------------------------------------------------------------------------------
def generalization_section(runs: list[dict], plots: Path, out_dir: Path) -> list[str]:
    metric = primary(runs)
    head, ood = f"target/test_{metric}", f"target/ood_test_{metric}"
    settings = by_setting(runs)
    has_ood = any(r["metrics"].get(ood) is not None for r in runs)
    alphas = sorted({float(k.split("/")[1]) for r in runs for k in r["metrics"]
                     if k.startswith("wise_ft/") and k.endswith(f"/{head}") and is_number(k.split("/")[1])})
    if not has_ood and not alphas:
        return []
    lines = ["## Generalization", ""]
    if has_ood:
        lines += [f"In-distribution ({head}) vs out-of-distribution ({ood}: held-out domains or a shifted test "
                  "split, see the data config); the gap is paired within each run.", "",
                  row(["setting", "n", "ID", "OOD", "OOD − ID (95% CI)"]), row(["---", "---:", "---:", "---:", "---:"])]
        points = []
        for label, members in settings.items():
            i, o = stats.mean_ci(values(members, head)), stats.mean_ci(values(members, ood))
            gap = stats.mean_ci([r["metrics"][ood] - r["metrics"][head] for r in members
                                 if r["metrics"].get(ood) is not None and r["metrics"].get(head) is not None])
            lines.append(row([label, str(o["n"]), mean_ci_text(i), mean_ci_text(o), mean_ci_text(gap)]))
            if i["n"]:
                points.append(point(label, i, group="in-distribution"))
            if o["n"]:
                points.append(point(label, o, group="out-of-distribution"))
        lines += figure_lines(figures.categorical(points, head, ylabel=f"target test {metric} (ID and OOD)",
                                                  save_to=plots / f"id_vs_ood_{metric}"), out_dir)
    if alphas:
        lines += ["", "WiSE-FT: (1−α)·θ_start + α·θ_tuned on the backbone, mean ± 95% CI over seeds at each α "
                  "(α = 1 is the fine-tuned model; the selected α is chosen on validation).", ""]
        lines += wise_ft_table(settings, alphas, head)
        for label, members in settings.items():
            keys = [head] + ([ood] if has_ood else []) + ["source/test_acc"]
            curves = {k: [stats.mean_ci(values(members, f"wise_ft/{a:g}/{k}")) for a in alphas] for k in keys}
            curves = {k: c for k, c in curves.items() if any(p["n"] for p in c)}
            if not curves:
                continue
            plot = figures.wise_ft(alphas, curves, save_to=plots / f"wise_ft_{slug(label)}")
            plot.caption = f"{label}: {plot.caption}"
            lines += figure_lines(plot, out_dir)
    return lines


def wise_ft_table(settings: dict[str, list[dict]], alphas: list[float], head: str) -> list[str]:
    """Per setting: the target test metric at each α, the α each seed chose on validation, and the
    test metric and forgetting at the chosen α."""
    lines = [row(["setting", "n", *[f"α = {a:g}" for a in alphas], "chosen α (seeds)", f"{head} at chosen α",
                  "forgetting at chosen α"]),
             row(["---", "---:", *["---:"] * len(alphas), "---", "---:", "---:"])]
    for label, members in settings.items():
        at = [stats.mean_ci(values(members, f"wise_ft/{a:g}/{head}")) for a in alphas]
        if not any(s["n"] for s in at):
            continue
        chosen = Counter(r["metrics"]["wise_ft/best_alpha"] for r in members
                         if r["metrics"].get("wise_ft/best_alpha") is not None)
        chosen_text = ", ".join(f"{a:g} ×{count}" for a, count in sorted(chosen.items(), reverse=True)) or NO_VALUE
        lines.append(row([label, str(max(s["n"] for s in at)), *[mean_ci_text(s) for s in at], chosen_text,
                          mean_ci_text(stats.mean_ci(values(members, f"wise_ft/{head}"))),
                          mean_ci_text(stats.mean_ci(values(members, "wise_ft/transfer/forgetting")))]))
    return lines + [""]


# -- paired comparison against a baseline setting -------------------------------------------------
def choose_baseline(labels: list[str], settings_params: dict[str, dict], baseline: str | None) -> str:
    if baseline is not None:
        if baseline not in labels:
            raise TransferlabError(f"report.baseline={baseline}: not a setting of this sweep; choose one of: "
                                   f"{', '.join(labels)}")
        return baseline
    for label in labels:
        if any(str(v).rsplit("/", 1)[-1] == "none" for v in settings_params.get(label, {}).values()):
            return label
    return labels[0]


def comparison_section(runs: list[dict], baseline: str | None = None, metric: str | None = None,
                       higher_is_better: bool = True) -> list[str]:
    settings = by_setting(runs)
    if len(settings) < 2:
        return []
    head = metric or f"target/test_{primary(runs)}"
    params = {r["setting"]: r.get("params", {}) for r in runs}
    base = choose_baseline(list(settings), params, baseline)
    per_seed = {label: {r["config"].get("seed"): r["metrics"].get(head) for r in members}
                for label, members in settings.items()}
    rows = stats.compare_to_baseline(per_seed, base)
    lines = [f"## Paired comparison: {head} against {base}", "",
             "Each setting against the baseline over the seeds both ran (the same split and source stage per seed): "
             "mean paired difference with its 95% CI, paired t-test and Wilcoxon signed-rank p-values, Holm-corrected "
             "across the settings compared; **win** / **loss**: Holm-adjusted t-test p < 0.05.", "",
             row(["setting", "paired seeds", f"Δ vs {base} (95% CI)", "t p (Holm)", "Wilcoxon p (Holm)", ""]),
             row(["---", "---:", "---:", "---:", "---:", "---"])]
    small = False
    for label, r in rows.items():
        if r["n"] == 0:
            lines.append(row([label, "0", NO_VALUE, NO_VALUE, NO_VALUE, ""]))
            continue
        small |= 0 < r["n"] < 6
        interval = f"{r['mean_diff']:+.4f}" if r["n"] < 2 else f"{r['mean_diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
        mark = stats.significance_mark(r, higher_is_better=higher_is_better)
        lines.append(row([label, str(r["n"]), interval, p_text(r["t_p"], r["t_p_holm"]),
                          p_text(r["wilcoxon_p"], r["wilcoxon_p_holm"]), f"**{mark}**" if mark != "ns" else "ns"]))
    if small:
        lines += ["", "With fewer than 6 paired seeds the two-sided Wilcoxon p cannot go below 0.05 "
                      "(its smallest value is 2/2ⁿ): read that column as a check, not a verdict."]
    return lines


def p_text(p: float, adjusted: float) -> str:
    return NO_VALUE if math.isnan(p) else f"{p:.3g} ({adjusted:.3g})"


# -- transferability ------------------------------------------------------------------------------
def transferability_section(runs: list[dict], plots: Path, out_dir: Path) -> list[str]:
    settings = by_setting(runs)
    present = [s for s in SCORES if any(r["metrics"].get(f"transferability/{s}") is not None for r in runs)]
    if not present:
        return []
    head = f"target/test_{primary(runs)}"
    means = {label: {key: stats.mean_ci(values(members, key))["mean"]
                     for key in [*(f"transferability/{s}" for s in present), head, "transfer/gain"]}
             for label, members in settings.items()}
    lines = ["## Transferability", "",
             "Scores of the target training set's features at the start of the target stage (before any "
             "fine-tuning; LEEP and NCE need a source head), per setting (mean over seeds), and how well each "
             "ranks the settings by their realized outcome. Rankings by such scores flip with small setup changes "
             "(arXiv 2204.01403): this is this sweep's own evidence, not a claim about the scores.", "",
             row(["setting", *[SCORES[s] for s in present], head, "transfer/gain"]),
             row(["---", *["---:"] * (len(present) + 2)])]
    for label, m in means.items():
        lines.append(row([label, *[fmt(m[f"transferability/{s}"]) for s in present], fmt(m[head]),
                          fmt(m["transfer/gain"])]))
    lines += ["", row(["score", "settings", f"Kendall τ vs {head} (p)", f"Spearman ρ vs {head} (p)",
                       "Kendall τ vs gain (p)", "Spearman ρ vs gain (p)"]),
              row(["---", "---:", "---:", "---:", "---:", "---:"])]
    figure_part: list[str] = []  # after the table, which they would otherwise split
    for s in present:
        key = f"transferability/{s}"
        xs = [m[key] for m in means.values()]
        outcome = stats.rank_correlation(xs, [m[head] for m in means.values()])
        gain = stats.rank_correlation(xs, [m["transfer/gain"] for m in means.values()])
        lines.append(row([SCORES[s], str(outcome["n"]), corr(outcome, "kendall"), corr(outcome, "spearman"),
                          corr(gain, "kendall"), corr(gain, "spearman")]))
        points = [{"label": label, "x": m[key], "y": m[head]} for label, m in means.items()
                  if not (math.isnan(m[key]) or math.isnan(m[head]))]
        if len(points) >= 2:
            note = (f"Kendall τ = {outcome['kendall_tau']:.2f} (p = {outcome['kendall_p']:.2g}), n = {outcome['n']} "
                    "settings" if outcome["n"] >= 3 and not math.isnan(outcome["kendall_tau"]) else None)
            figure_part += figure_lines(figures.scatter(points, key, head, note=note,
                                                        save_to=plots / f"transferability_{s}_vs_{slug(head)}"), out_dir)
    lines += ["", "Correlations need at least 3 settings with the score (scratch runs have no LEEP / NCE)."]
    return lines + figure_part


def corr(result: dict, name: str) -> str:
    value = result["kendall_tau" if name == "kendall" else "spearman_rho"]
    p = result[f"{name}_p"]
    return NO_VALUE if math.isnan(value) else f"{value:+.2f} ({p:.2g})"


# -- helpers --------------------------------------------------------------------------------------
def is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def slug(text: str) -> str:
    """A file-name-safe form of a metric or setting name."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def evidence_sections(runs: list[dict], out_dir: Path, baseline: str | None = None) -> list[str]:
    plots = out_dir / "plots"
    lines: list[str] = []
    for section in (stability_section, efficiency_section, generalization_section):
        part = section(runs, plots, out_dir)
        lines += ([""] + part) if part else []
    comparison = comparison_section(runs, baseline)
    lines += ([""] + comparison) if comparison else []
    part = transferability_section(runs, plots, out_dir)
    lines += ([""] + part) if part else []
    return lines
