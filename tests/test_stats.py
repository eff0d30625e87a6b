"""transferlab.stats against numpy/scipy and against hand computations written out here."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from transferlab import stats


def test_mean_ci_equals_t_interval():
    x = [0.81, 0.84, 0.79, 0.88, 0.83]
    got = stats.mean_ci(x + [None, math.nan])  # missing values are dropped, not zeros
    low, high = sps.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=sps.sem(x))
    assert got["n"] == 5
    assert got["mean"] == pytest.approx(np.mean(x))
    assert got["std"] == pytest.approx(np.std(x, ddof=1))
    assert (got["low"], got["high"]) == pytest.approx((low, high))
    assert got["ci"] == pytest.approx((high - low) / 2)


def test_mean_ci_one_value_has_no_interval():
    got = stats.mean_ci([0.7])
    assert got["n"] == 1 and got["mean"] == 0.7
    assert math.isnan(got["std"]) and math.isnan(got["ci"]) and math.isnan(got["low"])
    assert stats.mean_ci([])["n"] == 0


def test_stability_on_a_constructed_sweep():
    # seeds 0..5; the majority baseline differs per run (different test splits); seed 4 has no
    # baseline recorded, seed 5 no value (a run that never finished its metric).
    values = [0.80, 0.50, 0.62, 0.90, 0.30, None]
    baselines = [0.50, 0.50, 0.60, 0.55, None, 0.5]
    seeds = [10, 11, 12, 13, 14, 15]
    got = stats.stability(values, baselines, seeds)
    assert got["n"] == 5
    assert got["std"] == pytest.approx(np.std([0.80, 0.50, 0.62, 0.90, 0.30], ddof=1))
    assert (got["worst"], got["worst_seed"]) == (0.30, 14)
    assert (got["best"], got["best_seed"]) == (0.90, 13)
    # judged: seeds 10..13; failed: seed 11 (0.50 ≤ 0.50, "at or below"); 12 is above its 0.60
    assert got["n_judged"] == 4 and got["failed"] == 1 and got["failed_rate"] == 0.25


def test_stability_lower_is_better_and_unknown_baselines():
    got = stats.stability([0.1, 0.3, 0.2], seeds=["a", "b", "c"], higher_is_better=False)
    assert got["worst_seed"] == "b" and got["best_seed"] == "a"
    assert got["n_judged"] == 0 and math.isnan(got["failed_rate"])
    one = stats.stability([0.4], [0.5])
    assert math.isnan(one["std"]) and one["failed_rate"] == 1.0


def test_paired_comparison_equals_scipy():
    base = {0: 0.80, 1: 0.82, 2: 0.78, 3: 0.85, 4: 0.81, 5: 0.79, 6: 0.90}
    arm = {0: 0.83, 1: 0.81, 2: 0.84, 3: 0.88, 4: 0.86, 5: 0.85, 9: 0.99}  # seed 6, 9 unmatched
    got = stats.paired_comparison(arm, base)
    seeds = [0, 1, 2, 3, 4, 5]
    a, b = np.array([arm[s] for s in seeds]), np.array([base[s] for s in seeds])
    t = sps.ttest_rel(a, b)
    assert got["seeds"] == seeds and got["n"] == 6
    assert got["mean_diff"] == pytest.approx(np.mean(a - b))
    assert got["t_p"] == pytest.approx(t.pvalue)
    ci = t.confidence_interval(0.95)
    assert (got["low"], got["high"]) == pytest.approx((ci.low, ci.high))
    assert got["wilcoxon_p"] == pytest.approx(sps.wilcoxon(a, b).pvalue)


def signed_rank_p_by_enumeration(d) -> float:
    """Two-sided Wilcoxon p by listing all 2ⁿ sign assignments of the (mid-)ranks of |d|, zeros
    dropped: p = P(T⁺ ≤ t) + P(T⁺ ≥ n(n+1)/2 − t) with t = min(T⁺, T⁻), capped at 1."""
    d = np.asarray([v for v in d if v != 0])
    ranks = sps.rankdata(np.abs(d))
    t_plus = ranks[d > 0].sum()
    t = min(t_plus, ranks.sum() - t_plus)
    draws = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in
                      itertools.product([0, 1], repeat=len(d))])
    return min(1.0, np.mean(draws <= t + 1e-9) + np.mean(draws >= ranks.sum() - t - 1e-9))


@pytest.mark.parametrize("d", [
    [0.03, -0.01, 0.06, 0.03 + 0.01, 0.05, 0.07],  # no ties: the exact distribution
    [0.02, 0.02, -0.01, 0.04, 0.02, 0.05],  # ties in |d|
    [0.01, 0.0, -0.03, 0.04, 0.02, 0.0, 0.05],  # zero differences (dropped)
])
def test_wilcoxon_equals_enumeration(d):
    base = {s: 0.5 for s in range(len(d))}
    arm = {s: 0.5 + v for s, v in enumerate(d)}
    got = stats.paired_comparison(arm, base)
    rounded = np.round(np.array(list(arm.values())) - 0.5, 12)  # 0.5 + v − 0.5 loses bits
    assert got["wilcoxon_p"] == pytest.approx(signed_rank_p_by_enumeration(rounded))


def test_paired_comparison_degenerate_cases():
    assert stats.paired_comparison({0: 0.5}, {1: 0.5})["n"] == 0
    one = stats.paired_comparison({0: 0.6}, {0: 0.5})
    assert one["n"] == 1 and one["mean_diff"] == pytest.approx(0.1)
    assert math.isnan(one["ci"]) and math.isnan(one["t_p"]) and math.isnan(one["wilcoxon_p"])
    same = stats.paired_comparison({s: 0.7 for s in range(5)}, {s: 0.7 for s in range(5)})
    assert same["t_p"] == 1.0 and same["wilcoxon_p"] == 1.0 and same["ci"] == 0.0
    # the same +0.1 on every seed, after float rounding (0.8 − 0.7 ≠ 0.9 − 0.8 in binary)
    shift = stats.paired_comparison({s: 0.1 * s + 0.1 for s in range(5)}, {s: 0.1 * s for s in range(5)})
    assert shift["t_p"] == 0.0 and shift["ci"] == 0.0
    assert shift["wilcoxon_p"] == pytest.approx(2 / 2**5)


def test_holm_equals_hand_computation():
    # p sorted: 0.01 (×4 = 0.04), 0.02 (×3 = 0.06), 0.03 (×2 = 0.06), 0.04 (×1 = 0.04 → max 0.06)
    assert stats.holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    # NaN (an untestable setting) is outside the family, so m = 2: 0.2 × 2 = 0.4; 0.3 × 1 → 0.4
    got = stats.holm([0.3, math.nan, 0.2])
    assert got[0] == pytest.approx(0.4) and math.isnan(got[1]) and got[2] == pytest.approx(0.4)
    # the cap at 1: 0.6 × 2 = 1.2 → 1; 0.7 × 1 → max(1, 0.7) = 1
    assert stats.holm([0.7, 0.6]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


def test_compare_to_baseline_holm_and_marks():
    rng = np.random.default_rng(0)
    seeds = range(8)
    base = {s: 0.80 + 0.01 * rng.standard_normal() for s in seeds}
    by_setting = {
        "none": base,
        "better": {s: base[s] + 0.05 + 0.005 * rng.standard_normal() for s in seeds},
        "worse": {s: base[s] - 0.04 + 0.005 * rng.standard_normal() for s in seeds},
        "same": {s: base[s] + 0.01 * rng.standard_normal() for s in seeds},
    }
    rows = stats.compare_to_baseline(by_setting, "none")
    assert list(rows) == ["better", "worse", "same"]
    raw = [rows[k]["t_p"] for k in rows]
    assert [rows[k]["t_p_holm"] for k in rows] == pytest.approx(stats.holm(raw))
    assert [rows[k]["wilcoxon_p_holm"] for k in rows] == pytest.approx(stats.holm([rows[k]["wilcoxon_p"] for k in rows]))
    marks = {k: stats.significance_mark(row) for k, row in rows.items()}
    assert marks == {"better": "win", "worse": "loss", "same": "ns"}
    # forgetting: lower is better, so the larger value is the loss
    assert stats.significance_mark(rows["better"], higher_is_better=False) == "loss"
    # 8 seeds all one sign: the exact Wilcoxon p = 2/256, below 0.05 even after Holm × 3
    assert stats.significance_mark(rows["better"], test="wilcoxon_p_holm") == "win"
    with pytest.raises(KeyError, match="baseline setting 'nope'"):
        stats.compare_to_baseline(by_setting, "nope")


def kendall_tau_b_by_pairs(x, y) -> float:
    """τ-b = (C − D) / √((n₀ − n₁)(n₀ − n₂)): concordant/discordant pairs counted one by one."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        ties_x += sx == 0
        ties_y += sy == 0
        concordant += sx * sy > 0
        discordant += sx * sy < 0
    n0 = len(x) * (len(x) - 1) / 2
    return (concordant - discordant) / math.sqrt((n0 - ties_x) * (n0 - ties_y))


def test_rank_correlation_equals_scipy_and_hand_tau():
    score = [1.2, 0.4, 2.2, 2.2, -0.3, 0.9, None]  # a tie, and a setting without a score
    outcome = [0.81, 0.70, 0.84, 0.86, 0.72, 0.69, 0.90]
    got = stats.rank_correlation(score, outcome)
    x, y = np.array(score[:6], dtype=float), np.array(outcome[:6])
    assert got["n"] == 6
    assert got["kendall_tau"] == pytest.approx(kendall_tau_b_by_pairs(x, y))
    assert got["kendall_p"] == pytest.approx(sps.kendalltau(x, y).pvalue)
    ranks_x, ranks_y = sps.rankdata(x), sps.rankdata(y)
    assert got["spearman_rho"] == pytest.approx(np.corrcoef(ranks_x, ranks_y)[0, 1])
    assert got["spearman_p"] == pytest.approx(sps.spearmanr(x, y).pvalue)


def test_rank_correlation_undefined_cases_are_nan():
    assert math.isnan(stats.rank_correlation([1, 2], [3, 4])["kendall_tau"])
    assert math.isnan(stats.rank_correlation([1, 1, 1], [3, 4, 5])["spearman_rho"])
    with pytest.raises(ValueError, match="3 scores, 2 outcomes"):
        stats.rank_correlation([1, 2, 3], [1, 2])
