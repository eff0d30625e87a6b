"""The report's evidence sections — the three open problems of transfer and two comparisons:

- **Stability**: per setting, std, worst and best seed, and the failed-run rate (a run fails at or
  below its majority-class baseline, results.json `task.majority_test`; at or above it when lower
  is better).
- **Efficiency**: trainable / total parameters, stage wall times, target samples/s, peak memory;
  the headline metric against trainable parameters and against fit time.
- **Generalization**: in- vs out-of-distribution test (`target/ood_test_<metric>`), the gap paired
  within each run; the WiSE-FT curve (`wise_ft/<α>/…`) when runs recorded one.
- **Paired comparison** against a baseline setting (the arm whose swept value is `none`, else the
  first; `report.baseline` / `--baseline` to choose), of every reported metric (the headline, OOD,
  the source metric after transfer, forgetting; `--metric` to choose): the paired difference over
  seeds with its 95% CI, paired t and Wilcoxon p-values, Holm-corrected across settings within each
  metric; wins and losses marked in each metric's own direction (results.json
  `task.higher_is_better` for the target's; forgetting lower; a source perplexity lower). Then the
  source metric before / after per seed.
- **Transferability**: LogME / LEEP / NCE / H-score per setting, and across settings Kendall's τ
  and Spearman's ρ against the realized target metric and gain.

Each section function takes the report's runs (report.runs.load_run dicts, with "setting",
"metrics", "config", "task") and the plots folder, and returns its report.md lines. Seeds are the
trial seed (`config.seed`); settings never pool different hyper-parameters (DomainBed #111):
everything but the seed that was swept is part of the setting.
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


def primary_metric(run: dict) -> str:
    """The run's headline metric ("acc", "f1", "ppl"): results.json's task.primary_metric; acc for
    runs recorded before results.json had a task block."""
    return str((run.get("task") or {}).get("primary_metric") or "acc")


def primary(runs: list[dict]) -> str:
    """The first run's primary metric (acc for no runs)."""
    return primary_metric(runs[0]) if runs else "acc"


def higher_is_better(runs: list[dict]) -> bool:
    """The headline metric's direction: results.json task.higher_is_better (absent: true; false
    for a perplexity or a loss), of the first run that says."""
    for r in runs:
        flag = (r.get("task") or {}).get("higher_is_better")
        if flag is not None:
            return flag is not False
    return True


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
    higher = higher_is_better(runs)
    rule = ("at or below the majority-class baseline of the run's test split" if higher else
            "at or above the majority-class baseline of the run's test split (lower is better)")
    lines = ["## Stability", "",
             f"Per setting over seeds: {head} mean ± 95% CI, its std, worst and best seed, and failed runs — "
             f"{rule} (Mosbach et al. 2021).", "",
             row(["setting", "n", f"{head}", "std", "worst (seed)", "best (seed)", "failed runs"]),
             row(["---", "---:", "---:", "---:", "---:", "---:", "---:"])]
    points, majorities = [], set()
    for label, members in settings.items():
        summary = stats.mean_ci(values(members, head))
        s = stats.stability(values(members, head), [(r.get("task") or {}).get("majority_test") for r in members],
                            [r["config"].get("seed") for r in members], higher_is_better=higher)
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
              ("time/target_fit_s", "target fit (s)", 1),
              ("efficiency/target_samples_per_s", "target samples/s", 1),
              ("efficiency/peak_rss_mb", "peak RSS (MB)", 0)]
# Stage times with a stage-cache hit flag beside them: (time key, hit key, name).
CACHED_STAGES = [("time/source_s", "cache/source_hit", "source stage")]
PEAK_SCOPE = "efficiency/peak_rss_scope"  # "job": measured per job (reset at its start); else the process's running max


def cached_stages(runs: list[dict]) -> list[tuple[str, str, str]]:
    """The source stage and every method's statistics (time/<m>_statistics_s with cache/<m>_statistics_hit)."""
    names = dict.fromkeys(k[len("time/"):-len("_statistics_s")] for r in runs for k in r["metrics"]
                          if k.startswith("time/") and k.endswith("_statistics_s"))
    return CACHED_STAGES + [(f"time/{m}_statistics_s", f"cache/{m}_statistics_hit", f"{m} statistics") for m in names]


def split_by_cache(members: list[dict], time_key: str, hit_key: str) -> tuple[dict, dict]:
    """(computed, from the cache): the stage's time over the runs that computed it (cache miss, or
    no cache) and over those that loaded it from the stage cache."""
    computed = [r["metrics"].get(time_key) for r in members if r["metrics"].get(hit_key) is not True]
    cached = [r["metrics"].get(time_key) for r in members if r["metrics"].get(hit_key) is True]
    return stats.mean_ci(computed), stats.mean_ci(cached)


def time_cell(summary: dict, n_runs: int) -> str:
    if not summary["n"]:
        return NO_VALUE
    return f"{summary['mean']:.1f}" + ("" if summary["n"] == n_runs else f" (×{summary['n']})")


def efficiency_section(runs: list[dict], plots: Path, out_dir: Path) -> list[str]:
    settings = by_setting(runs)
    head = f"target/test_{primary(runs)}"
    present = [(k, name, d) for k, name, d in EFFICIENCY if any(r["metrics"].get(k) is not None for r in runs)]
    per_job = all(r["metrics"].get(PEAK_SCOPE) == "job" for r in runs if r["metrics"].get("efficiency/peak_rss_mb") is not None)
    several = len([r for r in runs if r["metrics"].get("efficiency/peak_rss_mb") is not None]) > 1
    if several and not per_job:
        present = [(k, "peak RSS, process max so far (MB)" if k == "efficiency/peak_rss_mb" else name, d)
                   for k, name, d in present]
    timed = [(t, h, name) for t, h, name in cached_stages(runs) if any(r["metrics"].get(t) is not None for r in runs)]
    time_names = [f"{name} {kind} (s)" for _, _, name in timed for kind in ("computed", "from cache")]
    lines = ["## Efficiency", "",
             "Per setting, the mean over seeds. Wall times and samples/s on a shared machine are upper bounds. "
             "A stage's time is shown apart for the runs that computed it and those that took it from the stage "
             "cache (≈ 0 s: its cost was paid once, by another run); (×k): over k of the setting's runs.", "",
             row(["setting", "n", *time_names, *[name for _, name, _ in present], head]),
             row(["---", "---:", *["---:"] * (len(time_names) + len(present)), "---:"])]
    if several and not per_job:
        lines[2:2] = ["Peak RSS is the process's running maximum (`ru_maxrss`), not each job's own peak: in a "
                      "multirun whose jobs share a process (Hydra's basic launcher, joblib workers) a job's value "
                      "includes every earlier job's peak, so it grows with the job order and is not this setting's "
                      "memory cost. Only runs that measured it per job (results.json "
                      f"`{PEAK_SCOPE}: job`) can be compared.", ""]
    by_params, by_time = [], []
    for label, members in settings.items():
        cells = []
        for time_key, hit_key, _ in timed:
            computed, cached = split_by_cache(members, time_key, hit_key)
            cells += [time_cell(computed, len(members)), time_cell(cached, len(members))]
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


LOWER_IS_BETTER = {"ppl", "perplexity", "nll", "loss"}  # metric names whose direction needs no task block


def metric_direction(key: str, runs: list[dict]) -> bool:
    """Whether higher is better for `key`: forgetting (signed: positive = lost) no; the transfer
    gain (signed to be an improvement) yes; a source metric by its name (accuracy yes, perplexity
    no); the target metrics as the task block says."""
    if "forgetting" in key:
        return False
    if key.endswith("/gain"):
        return True
    name = key.rsplit("/", 1)[-1].removeprefix("ood_").removeprefix("test_").removeprefix("val_")
    name = name.removesuffix("_after").removesuffix("_before")
    if key.startswith("source/"):
        return name not in LOWER_IS_BETTER
    return higher_is_better(runs) if name == primary(runs) else name not in LOWER_IS_BETTER


def source_metric(runs: list[dict]) -> str | None:
    """The source task's metric name ("acc", or "ppl" for a language model's general-text corpus)
    with values in the runs: source/test_<m>_before and _after."""
    for r in runs:
        for key, value in r["metrics"].items():
            if key.startswith("source/test_") and key.endswith("_before") and value is not None:
                return key[len("source/test_"):-len("_before")]
    return None


def compared_metrics(runs: list[dict]) -> list[str]:
    """Every metric the report shows that a paired comparison can speak to, present in the runs:
    the headline, OOD, the source task after transfer, forgetting."""
    m, s = primary(runs), source_metric(runs)
    candidates = [f"target/test_{m}", f"target/ood_test_{m}", *([f"source/test_{s}_after"] if s else []),
                  "transfer/forgetting"]
    return [k for k in candidates if k == candidates[0] or any(r["metrics"].get(k) is not None for r in runs)]


def comparison_section(runs: list[dict], baseline: str | None = None, metric: str | None = None,
                       higher_is_better: bool | None = None, explain: bool = True) -> list[str]:
    """The paired comparison of `metric` (default: the headline) against the baseline setting;
    `higher_is_better` None: the metric's own direction (`metric_direction`)."""
    settings = by_setting(runs)
    if len(settings) < 2:
        return []
    head = metric or f"target/test_{primary(runs)}"
    higher = metric_direction(head, runs) if higher_is_better is None else higher_is_better
    params = {r["setting"]: r.get("params", {}) for r in runs}
    aliases = {r.get("setting_overrides"): r["setting"] for r in runs if r.get("setting_overrides")}
    base = choose_baseline(list(settings), params, aliases.get(baseline, baseline))
    per_seed = {label: {r["config"].get("seed"): r["metrics"].get(head) for r in members}
                for label, members in settings.items()}
    if not any(v is not None for v in per_seed[base].values()):
        return [f"## Paired comparison: {head} against {base}", "",
                f"{base} has no {head} value (e.g. a scratch run has no source stage): nothing to pair against."]
    with_values = {label: seeds for label, seeds in per_seed.items()
                   if label == base or any(v is not None for v in seeds.values())}
    rows = stats.compare_to_baseline(with_values, base)
    direction = "higher" if higher else "lower"
    intro = ("Each setting against the baseline over the seeds both ran (the same split and source stage per seed): "
             "mean paired difference with its 95% CI, paired t-test and Wilcoxon signed-rank p-values, Holm-corrected "
             f"across the settings compared for this metric; **win** / **loss**: Holm-adjusted t-test p < 0.05, "
             f"{direction} {head} being better." if explain else
             f"As above, for {head}: {direction} is better.")
    lines = [f"## Paired comparison: {head} against {base}", "", intro, "",
             row(["setting", "paired seeds", f"Δ vs {base} (95% CI)", "t p (Holm)", "Wilcoxon p (Holm)", "verdict"]),
             row(["---", "---:", "---:", "---:", "---:", "---"])]
    small = False
    for label, r in rows.items():
        if r["n"] == 0:
            lines.append(row([label, "0", NO_VALUE, NO_VALUE, NO_VALUE, NO_VALUE]))
            continue
        small |= 0 < r["n"] < 6
        interval = f"{r['mean_diff']:+.4f}" if r["n"] < 2 else f"{r['mean_diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
        mark = stats.significance_mark(r, higher_is_better=higher)
        lines.append(row([label, str(r["n"]), interval, p_text(r["t_p"], r["t_p_holm"]),
                          p_text(r["wilcoxon_p"], r["wilcoxon_p_holm"]), f"**{mark}**" if mark != "ns" else "ns"]))
    skipped = [label for label in per_seed if label not in with_values]
    if skipped:
        lines += ["", f"No {head} value, not compared: {', '.join(skipped)}."]
    if small and explain:
        lines += ["", "With fewer than 6 paired seeds the two-sided Wilcoxon p cannot go below 0.05 "
                      "(its smallest value is 2/2ⁿ): read that column as a check, not a verdict."]
    return lines


SOURCE_SEEDS_LISTED = 200  # rows of the per-seed source table; beyond it, the table would bury the report


def source_per_seed_section(runs: list[dict]) -> list[str]:
    """Per setting and seed: the source test accuracy before and after the target stage, and the
    forgetting — what the forgetting comparison is made of."""
    settings = by_setting(runs)
    s = source_metric(runs)
    if s is None:
        return []
    before, after = f"source/test_{s}_before", f"source/test_{s}_after"
    rows_ = [(label, r) for label, members in settings.items() for r in members if r["metrics"].get(before) is not None]
    lost = "before − after" if metric_direction(before, runs) else "after − before"
    lines = ["## Source task per seed", "",
             f"The source test {s} before and after the target stage, per run (forgetting = {lost}).", "",
             row(["setting", "seed", f"source {s} before", f"source {s} after", "forgetting"]),
             row(["---", "---:", "---:", "---:", "---:"])]
    for label, r in rows_[:SOURCE_SEEDS_LISTED]:
        m = r["metrics"]
        lines.append(row([label, str(r["config"].get("seed")), fmt(m.get(before)), fmt(m.get(after)),
                          fmt(m.get("transfer/forgetting"))]))
    if len(rows_) > SOURCE_SEEDS_LISTED:
        lines += ["", f"… and {len(rows_) - SOURCE_SEEDS_LISTED} more runs (report.csv and each results.json have them)."]
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
    any_degenerate = False
    for s in present:
        key = f"transferability/{s}"
        xs = [m[key] for m in means.values()]
        outcomes = {"outcome": [m[head] for m in means.values()], "gain": [m["transfer/gain"] for m in means.values()]}
        cells, kendall_note = [], None
        for name, ys in outcomes.items():
            pairs = [(x, y) for x, y in zip(xs, ys) if _present(x) and _present(y)]
            why = degenerate([x for x, _ in pairs], SCORES[s]) or degenerate([y for _, y in pairs],
                                                                           head if name == "outcome" else "gain")
            result = stats.rank_correlation(xs, ys)
            if why and len(pairs) >= 3:
                any_degenerate = True
                cells += [f"degenerate: {why}"] * 2
            else:
                cells += [corr(result, "kendall"), corr(result, "spearman")]
            if name == "outcome":
                n_pairs = result["n"]
                if why and len(pairs) >= 3:
                    kendall_note = f"no τ: {why}"
                elif result["n"] >= 3 and not math.isnan(result["kendall_tau"]):
                    kendall_note = (f"Kendall τ = {result['kendall_tau']:.2f} (p = {result['kendall_p']:.2g}), "
                                    f"n = {result['n']} settings")
        lines.append(row([SCORES[s], str(n_pairs), *cells]))
        points = [{"label": label, "x": m[key], "y": m[head]} for label, m in means.items()
                  if not (math.isnan(m[key]) or math.isnan(m[head]))]
        if len(points) >= 2:
            figure_part += figure_lines(figures.scatter(points, key, head, note=kendall_note,
                                                        save_to=plots / f"transferability_{s}_vs_{slug(head)}"), out_dir)
    lines += ["", "Correlations need at least 3 settings with the score (scratch runs have no LEEP / NCE)."]
    if any_degenerate:
        lines += [f"degenerate: fewer than 3 distinct values, or at most half as many as settings (equal to "
                  f"{TIE_DIGITS} significant digits): the score (or the outcome) is saturated or tied, and a rank "
                  "correlation over it would be a number about ties, not evidence."]
    if not higher_is_better(runs):
        lines += [f"Lower {head} is better: a score that predicts the outcome has τ < 0 against it "
                  "(the gain is signed to be an improvement, so τ > 0 against the gain)."]
    regime = out_of_regime(runs, present)
    if regime:
        lines += [regime]
    return lines + figure_part


TIE_DIGITS = 4  # scores equal to this many significant digits (as the table prints them) are tied


def degenerate(xs: list[float], what: str) -> str | None:
    """Why a rank correlation over xs (one value per setting) says nothing — None when it can."""
    xs = sorted(float(x) for x in xs)
    if len(xs) < 3:
        return None  # too few settings: rank_correlation says so itself (NaN)
    scale = max(abs(xs[0]), abs(xs[-1]), 1e-12)
    tol = scale * 10 ** (1 - TIE_DIGITS) / 2
    distinct = 1 + sum(b - a > tol for a, b in zip(xs, xs[1:]))
    if distinct == 1:
        return f"{what} is {xs[0]:.4g} for all {len(xs)} settings"
    if distinct < 3 or distinct <= len(xs) / 2:
        return f"{what} takes {distinct} distinct values over {len(xs)} settings"
    return None


def out_of_regime(runs: list[dict], present: list[str]) -> str | None:
    """LogME and H-score estimate a (D × D) feature covariance from N examples: with N < D they
    are out of their regime. Needs results.json's transferability/examples and /feature_dim."""
    short = [(r["metrics"]["transferability/examples"], r["metrics"]["transferability/feature_dim"]) for r in runs
             if r["metrics"].get("transferability/examples") is not None
             and r["metrics"].get("transferability/feature_dim") is not None
             and r["metrics"]["transferability/examples"] < r["metrics"]["transferability/feature_dim"]]
    if not short or not {"logme", "hscore"} & set(present):
        return None
    n, d = min(short)
    return (f"Out of regime: {len(short)} runs scored fewer examples than feature dimensions (e.g. N = {n} < D = {d}): "
            "LogME and H-score estimate a D × D covariance from N examples, and are not to be trusted there.")


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


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


# -- where the weights moved (diagnostics.py) ----------------------------------------------------
DIAGNOSTIC_BLOCK = re.compile(r"^diagnostics/block(\d+)_(rel_change|eff_rank|cka)$")
DIAGNOSTIC_NAMES = {"rel_change": "relative change ‖θ−θ₀‖/‖θ₀‖", "eff_rank": "effective rank of ΔW",
                    "cka": "linear CKA, start vs tuned features"}


def diagnostics_section(runs: list[dict], plots: Path, out_dir: Path) -> list[str]:
    """Per setting and block: how far fine-tuning moved the weights, the rank of the move, and how
    similar the block's features stayed (mean ± 95% CI over seeds); a figure of change and CKA by
    depth, one line per setting."""
    settings = by_setting(runs)
    found: dict[str, set[int]] = {}
    for run in runs:
        for key, value in run["metrics"].items():
            match = DIAGNOSTIC_BLOCK.match(key)
            if match and value is not None:
                found.setdefault(match.group(2), set()).add(int(match.group(1)))
    if not found:
        return []
    lines = ["## Where the weights moved", "",
             "Per setting, the mean over seeds (± 95% CI) of each block's relative weight change, the mean effective "
             "rank of its weight matrices' change (exp of the entropy of the normalized singular values; LoRA "
             "folded into scale·BA) and linear CKA between the block's start and tuned features on target "
             "validation (1: unchanged). Total: ‖θ−θ₀‖/‖θ₀‖ over the whole backbone; features CKA: what the head reads.",
             "", row(["setting", "n", "total relative change", "features CKA"]), row(["---", "---:", "---:", "---:"])]
    for label, members in settings.items():
        total = stats.mean_ci(values(members, "diagnostics/total_rel_change"))
        cka = stats.mean_ci(values(members, "diagnostics/features_cka"))
        lines.append(row([label, str(len(members)), mean_ci_text(total), mean_ci_text(cka)]))
    for quantity in ("rel_change", "eff_rank", "cka"):
        blocks = sorted(found.get(quantity, ()))
        if not blocks:
            continue
        lines += ["", f"**{DIAGNOSTIC_NAMES[quantity]}**, by block:", "",
                  row(["setting", *(f"block {j}" for j in blocks)]), row(["---", *("---:" for _ in blocks)])]
        series = {}
        for label, members in settings.items():
            cells, points = [], []
            for j in blocks:
                summary = stats.mean_ci(values(members, f"diagnostics/block{j}_{quantity}"))
                cells.append(mean_ci_text(summary, 3))
                if summary["n"]:
                    points.append({"x": j, **summary})
            lines.append(row([label, *cells]))
            if points:
                series[label] = points
        if series and quantity != "eff_rank":
            plot = figures.numeric(series, f"diagnostics/{quantity}", "block", logx=False,
                                   save_to=plots / f"diagnostics_{quantity}_by_block")
            lines += figure_lines(plot, out_dir)
    return lines


def evidence_sections(runs: list[dict], out_dir: Path, baseline: str | None = None,
                      metrics: list[str] | None = None) -> list[str]:
    """`metrics`: what the paired comparison covers (None: every metric of `compared_metrics`)."""
    plots = out_dir / "plots"
    lines: list[str] = []
    for section in (stability_section, efficiency_section, generalization_section):
        part = section(runs, plots, out_dir)
        lines += ([""] + part) if part else []
    explain = True
    for metric in (compared_metrics(runs) if metrics is None else metrics):
        comparison = comparison_section(runs, baseline, metric, explain=explain)
        lines += ([""] + comparison) if comparison else []
        explain = explain and not comparison
    part = source_per_seed_section(runs)
    lines += ([""] + part) if part else []
    for section in (transferability_section, diagnostics_section):
        part = section(runs, plots, out_dir)
        lines += ([""] + part) if part else []
    return lines
