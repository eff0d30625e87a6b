"""Aggregates across tasks (Agarwal et al., NeurIPS 2021) against independent computations from
their definitions, and the report section on a synthetic multi-task sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from test_evidence import section
from test_report import PNG_MAGIC, make_config
from transferlab import aggregate, report, stats


def iqm_by_definition(x):
    """Sort, drop the bottom and top quarter (⌊n/4⌋ runs each), average the rest."""
    x = np.sort(np.asarray(x, dtype=float))
    cut = len(x) // 4
    return x[cut:len(x) - cut].mean()


def test_iqm_is_the_mean_of_the_middle_half():
    rng = np.random.default_rng(0)
    for n in (4, 5, 8, 10, 13):
        x = rng.normal(size=n)
        assert stats.iqm(x) == pytest.approx(iqm_by_definition(x))
    assert stats.iqm([1, 2, 3, 100]) == pytest.approx(2.5)  # the outlier is out


def test_probability_of_improvement_counts_pairs():
    x_tasks = [np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.5])]
    y_tasks = [np.array([2.0, 0.0]), np.array([0.5, 0.1, 0.9])]

    def by_pairs(x, y):
        return np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in x for b in y])

    expected = np.mean([by_pairs(x, y) for x, y in zip(x_tasks, y_tasks)])
    assert stats.probability_of_improvement(x_tasks, y_tasks)["value"] == pytest.approx(expected)
    # the Mann–Whitney U statistic over N·M, per task
    u = [scipy_stats.mannwhitneyu(x, y).statistic / (len(x) * len(y)) for x, y in zip(x_tasks, y_tasks)]
    assert expected == pytest.approx(np.mean(u))


def test_stratified_bootstrap_replays_draws_within_each_task():
    tasks = [np.array([0.1, 0.4, 0.5, 0.9]), np.array([0.2, 0.3, 0.8])]
    got = stats.aggregate_interval(tasks, "iqm", reps=300, seed=7)
    assert got["value"] == pytest.approx(iqm_by_definition(np.concatenate(tasks)))
    rng = np.random.default_rng(7)  # the documented draw order: task by task, (reps, n_task) each
    idx = [rng.integers(0, len(t), size=(300, len(t))) for t in tasks]
    samples = [iqm_by_definition(np.concatenate([t[i[b]] for t, i in zip(tasks, idx)])) for b in range(300)]
    assert (got["low"], got["high"]) == pytest.approx(tuple(np.percentile(samples, [2.5, 97.5])))
    mean = stats.aggregate_interval(tasks, "mean", reps=300, seed=7)
    assert mean["value"] == pytest.approx(np.concatenate(tasks).mean())


def test_stratified_bootstrap_interval_covers_like_a_t_interval():
    x = np.random.default_rng(3).normal(0.5, 0.1, size=200)
    got = stats.aggregate_interval([x], "mean", reps=4000)
    t = stats.mean_ci(x)
    assert got["low"] == pytest.approx(t["low"], abs=0.004) and got["high"] == pytest.approx(t["high"], abs=0.004)


def test_performance_profile_is_the_fraction_above_tau_per_task():
    tasks = [np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.6])]
    taus = [0.0, 0.3, 0.55, 1.0]
    got = stats.performance_profile(tasks, taus, reps=100)
    expected = [np.mean([np.mean([s > tau for s in t]) for t in tasks]) for tau in taus]
    assert got["profile"] == pytest.approx(expected)
    assert np.all(got["low"] <= got["profile"] + 1e-12) and np.all(got["profile"] <= got["high"] + 1e-12)


TASKS = {"digits": 0.1, "fashion_mnist": 0.2}
ACC = {("digits", "none"): [0.80, 0.82, 0.84], ("digits", "l2sp"): [0.85, 0.86, 0.90],
       ("fashion_mnist", "none"): [0.60, 0.62, 0.58], ("fashion_mnist", "l2sp"): [0.61, 0.66, 0.70]}


def multi_task_sweep(root):
    job = 0
    for (data, arm), accs in ACC.items():
        for seed, acc in enumerate(accs):
            folder = root / str(job)
            (folder / ".hydra").mkdir(parents=True)
            (folder / ".hydra" / "overrides.yaml").write_text(
                yaml.safe_dump([f"data={data}", f"+ablation/baselines={arm}", f"seed={seed}"]))
            (folder / "results.json").write_text(json.dumps(
                {"status": "completed", "metrics": {"target/test_acc": acc, "target/val_acc": acc},
                 "config": make_config(seed=seed),
                 "task": {"primary_metric": "acc", "higher_is_better": True, "majority_test": TASKS[data]}}))
            job += 1


def test_report_section_on_a_multi_task_sweep(tmp_path):
    multi_task_sweep(tmp_path)
    written = report.write_report(tmp_path)
    part = section(written["report.md"].read_text(), "Aggregates across tasks")
    norm = {m: [np.array([(a - TASKS[d]) / (1 - TASKS[d]) for a in ACC[(d, m)]]) for d in TASKS] for m in ("none", "l2sp")}
    iqm = iqm_by_definition(np.concatenate(norm["l2sp"]))
    line = next(ln for ln in part.splitlines() if ln.startswith("| l2sp |"))
    assert f"| l2sp | 2 | 6 | {iqm:.3f} [" in line
    poi = np.mean([np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in x for b in y])
                   for x, y in zip(norm["l2sp"], norm["none"])])
    assert line.split("|")[6].strip().startswith(f"{poi:.3f}")
    assert "| none | 2 | 6 |" in part and "(baseline)" in part and "| digits | 6 | 0.1 | 1 | chance |" in part.replace("data=", "")
    for name in ("aggregate_target_test_acc", "profiles_target_test_acc"):
        assert written[f"plots/{name}.png"].read_bytes()[:8] == PNG_MAGIC


def test_no_aggregate_section_for_a_single_task(tmp_path):
    multi_task_sweep(tmp_path)
    runs = report.assign_settings([r for r in report.load_runs(tmp_path) if "data=digits" in r["overrides"]])
    assert aggregate.aggregate_section(runs, tmp_path / "plots", tmp_path) == []
