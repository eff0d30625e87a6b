"""The report's evidence on synthetic sweeps (results.json written here, no training): a
lower-is-better headline metric (perplexity) honoured everywhere, paired comparisons of every
reported metric, stage times split by cache hits, the peak-memory caveat, degenerate
transferability correlations, settings shown by name, and no empty trailing column."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from test_report import make_config, md_cells
from transferlab import evidence, report

LM_TASK = {"kind": "language_modeling", "primary_metric": "ppl", "higher_is_better": False,
           "majority_test": 25.0}


def job(root, name, *, seed, arm, metrics, task=None, source="train", status="completed"):
    config = make_config(seed=seed, source=source, regularizer="l2sp" if arm == "l2sp" else "none")
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"+ablation/baselines={arm}", f"seed={seed}"]))
    (folder / "results.json").write_text(json.dumps({"status": status, "error": None, "metrics": metrics,
                                                     "config": config, "task": task or {"primary_metric": "acc"},
                                                     "provenance": {}}))


def section(md: str, title: str) -> str:
    """The lines of report.md's section `title` (up to the next heading)."""
    start = md.index(f"## {title}")
    rest = md[start + 3:]
    end = rest.find("\n## ")
    return md[start:] if end < 0 else md[start:start + 3 + end]


def table_row(text: str, first: str) -> list[str]:
    [line] = [ln for ln in text.splitlines() if ln.startswith(f"| {first} |")]
    return [c.strip() for c in line.strip("|").split("|")]


# ---------------------------------------------------------------------------------------------
# Lower is better


PPL = {"scratch": [30.0, 31.0, 28.0], "none": [22.0, 24.5, 21.0], "l2sp": [20.0, 22.3, 19.1]}
SOURCE_PPL_AFTER = {"none": [12.0, 12.5, 12.2], "l2sp": [10.5, 10.6, 10.4]}  # before: 10.0 (general text)


def lm_sweep(root):
    for arm, ppls in PPL.items():
        for seed, ppl in enumerate(ppls):
            scratch = arm == "scratch"
            after = None if scratch else SOURCE_PPL_AFTER[arm][seed]
            job(root, f"{arm}{seed}", seed=seed, arm=arm, task=LM_TASK, source="scratch" if scratch else "train",
                metrics={"target/test_ppl": ppl, "target/val_ppl": ppl + 0.5,
                         "source/test_ppl_before": None if scratch else 10.0, "source/test_ppl_after": after,
                         "transfer/forgetting": None if scratch else after - 10.0})


def test_a_lower_is_better_metric_signs_gain_stability_comparison_and_best(tmp_path):
    lm_sweep(tmp_path)
    runs = report.add_gains(report.assign_settings(report.load_runs(tmp_path)))
    gains = {r["name"]: r["metrics"].get("transfer/gain") for r in runs}
    for seed in range(3):  # improvement = scratch − run: positive when transfer lowers perplexity
        assert gains[f"l2sp{seed}"] == pytest.approx(PPL["scratch"][seed] - PPL["l2sp"][seed])
        assert gains[f"none{seed}"] == pytest.approx(PPL["scratch"][seed] - PPL["none"][seed])
    rows = {row["setting"]: row for row in report.summarize_settings(runs)}
    assert not rows["l2sp"]["negative_transfer"] and rows["l2sp"]["transfer/gain"]["mean"] > 0

    md = report.write_report(tmp_path)["report.md"].read_text()
    # stability: a run fails at or ABOVE the floor (25): every scratch run, no transfer run
    stability = section(md, "Stability")
    assert "at or above the majority-class baseline" in stability
    assert table_row(stability, "scratch")[-1] == "3/3 (100%)"
    assert table_row(stability, "l2sp")[-1] == "0/3 (0%)"
    # worst = highest perplexity, best = lowest
    assert table_row(stability, "none")[4] == "24.5000 (1)" and table_row(stability, "none")[5] == "21.0000 (2)"
    # paired comparison: lower perplexity than the baseline `none` is a win
    comparison = section(md, "Paired comparison: target/test_ppl against none")
    l2sp = table_row(comparison, "l2sp")
    diffs = np.array(PPL["l2sp"]) - np.array(PPL["none"])
    assert l2sp[2].startswith(f"{diffs.mean():+.4f}")
    p = scipy_stats.ttest_1samp(diffs, 0).pvalue
    assert p < 0.05 / 2 and l2sp[-1] == "**win**"  # Holm over 2 settings still below 0.05
    assert table_row(comparison, "scratch")[-1] == "**loss**"
    assert "lower target/test_ppl being better" in comparison
    # the source perplexity after transfer: lower is better, whatever the target task says
    source = section(md, "Paired comparison: source/test_ppl_after against none")
    assert "lower is better" in source and table_row(source, "l2sp")[-1] == "**win**"
    assert table_row(section(md, "Paired comparison: transfer/forgetting against none"), "l2sp")[-1] == "**win**"
    assert "forgetting = after − before" in section(md, "Source task per seed")
    # the headline best is the lowest mean
    assert f"Best mean target/test_ppl (lower is better): `l2sp` ({np.mean(PPL['l2sp']):.4f}" in md


def test_higher_is_better_is_the_default_and_failure_is_at_or_below(tmp_path):
    for arm, accs in {"none": [0.5, 0.8], "l2sp": [0.7, 0.9]}.items():
        for seed, acc in enumerate(accs):
            job(tmp_path, f"{arm}{seed}", seed=seed, arm=arm, task={"primary_metric": "acc", "majority_test": 0.5},
                metrics={"target/test_acc": acc})
    md = report.write_report(tmp_path)["report.md"].read_text()
    stability = section(md, "Stability")
    assert "at or below the majority-class baseline" in stability
    assert table_row(stability, "none")[-1] == "1/2 (50%)"  # 0.5 ≤ 0.5
    assert "Best mean target/test_acc (higher is better): `l2sp`" in md


# ---------------------------------------------------------------------------------------------
# Every reported metric compared; the source task per seed


def test_every_reported_metric_gets_a_paired_comparison(tmp_path):
    forgetting = {"none": [0.10, 0.12, 0.14, 0.11], "l2sp": [0.02, 0.03, 0.05, 0.02]}
    for arm in ("none", "l2sp"):
        for seed in range(4):
            f = forgetting[arm][seed]
            job(tmp_path, f"{arm}{seed}", seed=seed, arm=arm,
                metrics={"target/test_acc": 0.8 + 0.01 * seed, "target/ood_test_acc": 0.6 + 0.02 * seed,
                         "source/test_acc_before": 0.9, "source/test_acc_after": round(0.9 - f, 6),
                         "transfer/forgetting": f})
    md = report.write_report(tmp_path)["report.md"].read_text()
    titles = re.findall(r"^## Paired comparison: (\S+) against none$", md, flags=re.M)
    assert titles == ["target/test_acc", "target/ood_test_acc", "source/test_acc_after", "transfer/forgetting"]
    d = np.array(forgetting["l2sp"]) - np.array(forgetting["none"])
    lo, hi = d.mean() + np.array([-1, 1]) * scipy_stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    cells = table_row(section(md, "Paired comparison: transfer/forgetting against none"), "l2sp")
    assert cells[2] == f"{d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]"
    assert cells[-1] == "**win**"  # less forgetting is better
    assert table_row(section(md, "Paired comparison: source/test_acc_after against none"), "l2sp")[-1] == "**win**"
    per_seed = section(md, "Source task per seed")
    assert "| l2sp | 2 | 0.9000 | 0.8500 | 0.0500 |" in per_seed and "source acc before" in per_seed
    # --metric narrows it to what is asked for
    only = report.write_report(tmp_path, tmp_path / "only", metrics=["transfer/forgetting"])["report.md"].read_text()
    assert re.findall(r"^## Paired comparison: (\S+)", only, flags=re.M) == ["transfer/forgetting"]


# ---------------------------------------------------------------------------------------------
# Efficiency: cached vs computed stages, peak memory


def test_stage_times_split_computed_from_cached_and_peak_rss_is_labelled(tmp_path):
    times = {"none": [(13.0, False), (0.2, True), (0.4, True)], "l2sp": [(11.0, None), (12.0, False), (0.3, True)]}
    rss = iter([1395.0, 2100.0, 2500.0, 3000.0, 3500.0, 3956.0])
    for arm, stages in times.items():
        for seed, (t, hit) in enumerate(stages):
            job(tmp_path, f"{arm}{seed}", seed=seed, arm=arm,
                metrics={"target/test_acc": 0.8, "time/source_s": t, "cache/source_hit": hit,
                         "time/ewc_statistics_s": 5.0 if seed == 0 else 0.1, "cache/ewc_statistics_hit": seed > 0,
                         "efficiency/peak_rss_mb": next(rss)})
    md = report.write_report(tmp_path)["report.md"].read_text()
    efficiency = section(md, "Efficiency")
    header = table_row(efficiency, "setting")
    cells = dict(zip(header, table_row(efficiency, "none")))
    assert cells["source stage computed (s)"] == "13.0 (×1)"
    assert cells["source stage from cache (s)"] == f"{np.mean([0.2, 0.4]):.1f} (×2)"
    assert cells["ewc statistics computed (s)"] == "5.0 (×1)" and cells["ewc statistics from cache (s)"] == "0.1 (×2)"
    l2sp = dict(zip(header, table_row(efficiency, "l2sp")))
    assert l2sp["source stage computed (s)"] == "11.5 (×2)"  # no cache (None) counts as computed
    assert "peak RSS, process max so far (MB)" in header and "running maximum" in efficiency

    per_job = tmp_path / "per_job"
    for seed in range(2):
        job(per_job, f"j{seed}", seed=seed, arm="none" if seed else "l2sp",
            metrics={"target/test_acc": 0.8, "efficiency/peak_rss_mb": 1000.0 + seed,
                     "efficiency/peak_rss_scope": "job"})
    efficiency = section(report.write_report(per_job)["report.md"].read_text(), "Efficiency")
    assert "peak RSS (MB)" in table_row(efficiency, "setting") and "running maximum" not in efficiency


# ---------------------------------------------------------------------------------------------
# Transferability: saturated or tied scores


def test_tied_or_saturated_scores_are_degenerate_not_a_tau(tmp_path):
    arms = ["a", "b", "c", "d"]
    accs = [0.70, 0.80, 0.75, 0.90]
    logme = [0.1, 0.3, 0.2, 0.5]
    for i, arm in enumerate(arms):
        for seed in range(2):
            job(tmp_path, f"{arm}{seed}", seed=seed, arm=arm,
                metrics={"target/test_acc": accs[i], "transferability/hscore": 1.9912,
                         "transferability/logme": logme[i], "transferability/leep": [-1.0, -1.0, -1.0, -0.5][i]})
    md = report.write_report(tmp_path)["report.md"].read_text()
    part = section(md, "Transferability")
    hscore = table_row(part, "H-score")
    assert hscore[2].startswith("degenerate: H-score is 1.991 for all 4 settings") and "+" not in hscore[2]
    leep = table_row(part, "LEEP")  # three arms share one value: 2 distinct of 4
    assert leep[2].startswith("degenerate: LEEP takes 2 distinct values over 4 settings")
    tau = scipy_stats.kendalltau(logme, accs)
    assert table_row(part, "LogME")[2] == f"{tau.statistic:+.2f} ({tau.pvalue:.2g})"


def test_degenerate_rule():
    assert evidence.degenerate([1.0, 1.00001, 0.99999], "x") == "x is 1 for all 3 settings"
    assert evidence.degenerate([0.1, 0.2, 0.3], "x") is None
    assert evidence.degenerate([0.1, 0.1, 0.2, 0.3], "x") is None  # one tie among 4: 3 distinct
    assert evidence.degenerate([0.1, 0.1, 0.1, 0.3], "x") == "x takes 2 distinct values over 4 settings"
    assert evidence.degenerate([0.1, 0.2], "x") is None  # too few: rank_correlation says so


# ---------------------------------------------------------------------------------------------
# Settings by name, no empty trailing column


def test_settings_are_shown_by_name_in_md_tex_and_figures(tmp_path):
    for arm, accs in {"none": [0.8, 0.82], "l2sp": [0.85, 0.86], "lwf": [0.84, 0.83]}.items():
        for seed, acc in enumerate(accs):
            job(tmp_path, f"{arm}{seed}", seed=seed, arm=arm, metrics={"target/test_acc": acc,
                                                                       "transfer/forgetting": 0.05 + 0.01 * seed})
    written = report.write_report(tmp_path, baseline="+ablation/baselines=l2sp")  # the overrides form works too
    md, tex = written["report.md"].read_text(), written["report.tex"].read_text()
    assert "ablation/baselines" not in md and "ablation/baselines" not in tex
    assert "\nl2sp & 2 &" in tex and md_cells(md.split("\n\n")[1], "lwf")["n"] == "2"
    assert "## Paired comparison: target/test_acc against l2sp" in md
    runs = report.assign_settings(report.load_runs(tmp_path))
    assert {r["setting"] for r in runs} == {"none", "l2sp", "lwf"}
    assert {r["params"]["ablation/baselines"] for r in runs} == {"none", "l2sp", "lwf"}  # csv keeps the key
    # no table of report.md ends in an empty column
    for line in md.splitlines():
        if line.startswith("| setting |") or line.startswith("| score |"):
            assert not line.rstrip().endswith("|  |"), line


def test_display_names_with_several_keys_and_collisions():
    labelled = [("+ablation/baselines=l2sp data=x", {"ablation/baselines": "l2sp", "data": "x"}),
                ("+ablation/baselines=none data=y", {"ablation/baselines": "none", "data": "y"})]
    assert [name for name, _, _ in report.with_display_names(labelled)] == ["baselines=l2sp data=x",
                                                                            "baselines=none data=y"]
    clash = [("+a/k=1", {"a/k": "1", "b/k": "1"}), ("+b/k=1", {"a/k": "1", "b/k": "1"})]
    assert [name for name, _, _ in report.with_display_names(clash)] == ["+a/k=1", "+b/k=1"]
    plain = [("regularizer=l2sp", {"regularizer": "l2sp"}), ("regularizer=none", {"regularizer": "none"})]
    assert [name for name, _, _ in report.with_display_names(plain)] == ["regularizer=l2sp", "regularizer=none"]


def test_negative_transfer_column_only_when_a_row_is_flagged(tmp_path):
    for arm, accs in {"none": [0.8, 0.82], "l2sp": [0.85, 0.86]}.items():
        for seed, acc in enumerate(accs):
            job(tmp_path, f"{arm}{seed}", seed=seed, arm=arm, metrics={"target/test_acc": acc})
    md = report.write_report(tmp_path)["report.md"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| setting | n |"))
    assert header.endswith("| interrupted |")


# ---------------------------------------------------------------------------------------------
# Where the weights moved


def test_diagnostics_section_averages_each_block_over_seeds_and_draws_change_and_cka(tmp_path):
    change = {"none": [[0.2, 0.5], [0.4, 0.7]], "l2sp": [[0.1, 0.2], [0.1, 0.4]]}  # per seed, per block
    for arm, seeds in change.items():
        for seed, blocks in enumerate(seeds):
            metrics = {"target/test_acc": 0.8, "diagnostics/total_rel_change": sum(blocks),
                       "diagnostics/features_cka": 0.9 - blocks[1] / 2}
            for j, c in enumerate(blocks):
                metrics |= {f"diagnostics/block{j}_rel_change": c, f"diagnostics/block{j}_cka": 1 - c / 2,
                            f"diagnostics/block{j}_eff_rank": 3.0 + j}
            job(tmp_path, f"{arm}{seed}", seed=seed, arm=arm, metrics=metrics)
    report.write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    text = section(md, "Where the weights moved")
    for arm, seeds in change.items():
        # block 1's relative change, mean ± t-interval over the two seeds, by hand
        values = [blocks[1] for blocks in seeds]
        half = scipy_stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / np.sqrt(2)
        rows = [ln for ln in text.splitlines() if ln.startswith(f"| {arm} |")]
        assert f"{np.mean(values):.3f} ± {half:.3f}" in rows[1]  # the rel_change table (after the totals)
    assert (tmp_path / "plots" / "diagnostics_rel_change_by_block.png").is_file()
    assert (tmp_path / "plots" / "diagnostics_cka_by_block.png").is_file()
