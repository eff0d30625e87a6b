"""Statistics a sweep report stands on: intervals, stability, paired comparisons, rank correlations.

Pure numpy/scipy on plain numbers, so the report (and a user's notebook) can call it on whatever
it read from results.json. Conventions, the same everywhere in this module:

- A "value" is one run's metric; None or NaN values are dropped before anything is computed, and
  every result says how many values (`n`) it used.
- An interval that cannot be computed (n < 2) is NaN, never 0: a table prints "n=1", a plot draws
  no bar.
- 95% intervals are Student-t: mean ± t(0.975, n−1)·sd/√n, sd with ddof=1.
- Paired comparisons match runs by seed (the trial seed; the hyper-parameters are the setting),
  so a seed present in only one of the two settings is left out, and the result lists the seeds
  it used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05
WIN, LOSS, NS = "win", "loss", "ns"


def finite(values: Iterable) -> np.ndarray:
    """The values as float64, without None and NaN."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return np.asarray(kept, dtype=np.float64)


def t_half_width(sd: float, n: int, confidence: float = CONFIDENCE) -> float:
    """t(1 − (1−confidence)/2, n−1)·sd/√n; NaN for n < 2."""
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))


# ---------------------------------------------------------------------------------------------
# One setting


def mean_ci(values: Iterable, confidence: float = CONFIDENCE) -> dict:
    """{"n", "mean", "std", "ci", "low", "high"}: ci is the half-width; std/ci/low/high NaN for n < 2."""
    x = finite(values)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    ci = t_half_width(std, n, confidence)
    return {"n": n, "mean": mean, "std": std, "ci": ci, "low": mean - ci, "high": mean + ci}


def stability(values: Sequence, baselines: Sequence | None = None, seeds: Sequence | None = None,
              higher_is_better: bool = True) -> dict:
    """How much a setting's outcome depends on the seed.

    values[i] is run i's target metric, baselines[i] its majority-class baseline
    (results.json `task.majority_test`, None when unknown), seeds[i] its seed. A run *fails* when
    its metric is at or below its baseline (Mosbach et al. 2021; Dodge et al. 2020) — at or above
    it when lower is better (`higher_is_better=False`: perplexity, loss). The failed
    rate is over the runs whose baseline is known (`n_judged`); NaN when none is.
    Returns n, std (ddof=1, NaN for n < 2), worst/best value and their seeds, failed, n_judged,
    failed_rate. Runs with no value (None/NaN) are left out of everything.
    """
    baselines = [None] * len(values) if baselines is None else list(baselines)
    seeds = list(range(len(values))) if seeds is None else list(seeds)
    if not len(values) == len(baselines) == len(seeds):
        raise ValueError(f"stability: {len(values)} values, {len(baselines)} baselines, {len(seeds)} seeds")
    runs = [(float(v), b, s) for v, b, s in zip(values, baselines, seeds)
            if v is not None and not math.isnan(float(v))]
    result = {"n": len(runs), "std": math.nan, "worst": math.nan, "worst_seed": None,
              "best": math.nan, "best_seed": None, "failed": 0, "n_judged": 0, "failed_rate": math.nan}
    if not runs:
        return result
    x = np.array([v for v, _, _ in runs])
    sign = 1.0 if higher_is_better else -1.0
    worst, best = int(np.argmin(sign * x)), int(np.argmax(sign * x))  # first seed on ties
    judged = [(v, float(b)) for v, b, _ in runs if b is not None and not math.isnan(float(b))]
    failed = sum((v <= b) if higher_is_better else (v >= b) for v, b in judged)
    result |= {"std": float(x.std(ddof=1)) if len(x) > 1 else math.nan,
               "worst": float(x[worst]), "worst_seed": runs[worst][2],
               "best": float(x[best]), "best_seed": runs[best][2],
               "failed": failed, "n_judged": len(judged),
               "failed_rate": failed / len(judged) if judged else math.nan}
    return result


# ---------------------------------------------------------------------------------------------
# A setting against a baseline setting, over matched seeds


def paired_comparison(values: Mapping, baseline: Mapping, confidence: float = CONFIDENCE) -> dict:
    """values and baseline map seed → metric. Over the seeds both have (None/NaN dropped):
    the mean difference d = value − baseline, its t-interval, the paired t-test p and the Wilcoxon
    signed-rank p (scipy defaults: zero differences dropped, exact distribution for small n,
    a permutation distribution when |d| has ties).

    Degenerate cases, decided here rather than left to scipy's warnings:
    n = 0: everything NaN; n = 1: the difference, no interval, p NaN;
    every difference 0: p = 1 for both tests (no evidence of any difference), interval [0, 0];
    every difference the same non-zero number: t-test p = 0 (zero spread), interval [d, d], the
    Wilcoxon p is computed as usual (with all signs equal it is its smallest, 2/2ⁿ).
    """
    seeds = [s for s in values if s in baseline and _present(values[s]) and _present(baseline[s])]
    d = np.array([float(values[s]) - float(baseline[s]) for s in seeds], dtype=np.float64)
    n = len(d)
    result = {"n": n, "seeds": seeds, "mean_diff": math.nan, "ci": math.nan, "low": math.nan,
              "high": math.nan, "t_p": math.nan, "wilcoxon_p": math.nan}
    if n == 0:
        return result
    mean = float(d.mean())
    result |= {"mean_diff": mean}
    if n < 2:
        return result
    scale = max(1.0, float(np.abs(d).max()))
    if np.all(np.abs(d) <= 1e-12 * scale):  # no difference at all: scipy would give 0/0
        return result | {"ci": 0.0, "low": mean, "high": mean, "t_p": 1.0, "wilcoxon_p": 1.0}
    with warnings.catch_warnings():  # small n with some zero differences: scipy warns, p is right
        warnings.simplefilter("ignore", (RuntimeWarning, UserWarning))
        wilcoxon_p = float(stats.wilcoxon(d).pvalue)
    if np.ptp(d) <= 1e-12 * scale:  # one constant difference: t = ±inf, scipy returns rounding noise
        return result | {"ci": 0.0, "low": mean, "high": mean, "t_p": 0.0, "wilcoxon_p": wilcoxon_p}
    ci = t_half_width(float(d.std(ddof=1)), n, confidence)
    result |= {"ci": ci, "low": mean - ci, "high": mean + ci,
               "t_p": float(stats.ttest_1samp(d, 0.0).pvalue), "wilcoxon_p": wilcoxon_p}
    return result


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family = the non-NaN entries; NaN stays NaN).

    Sorted ascending p_(1) ≤ … ≤ p_(m): adj_(i) = max_{j ≤ i} min(1, (m − j + 1)·p_(j)).
    Rejecting adj < α controls the family-wise error rate at α.
    """
    p = np.asarray([math.nan if v is None else float(v) for v in pvalues], dtype=np.float64)
    tested = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(len(p), math.nan)
    m = len(tested)
    running = 0.0
    for rank, index in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def compare_to_baseline(by_setting: Mapping[str, Mapping], baseline: str,
                        confidence: float = CONFIDENCE) -> dict[str, dict]:
    """by_setting maps setting → {seed: metric}. Every setting other than `baseline` compared to
    it (`paired_comparison`), with Holm-adjusted p-values across those settings added as
    "t_p_holm" and "wilcoxon_p_holm". Order of by_setting is kept."""
    if baseline not in by_setting:
        raise KeyError(f"baseline setting {baseline!r} is not among {list(by_setting)}")
    rows = {name: paired_comparison(values, by_setting[baseline], confidence)
            for name, values in by_setting.items() if name != baseline}
    for test in ("t_p", "wilcoxon_p"):
        for row, adjusted in zip(rows.values(), holm([row[test] for row in rows.values()])):
            row[f"{test}_holm"] = adjusted
    return rows


def significance_mark(row: dict, alpha: float = ALPHA, higher_is_better: bool = True,
                      test: str = "t_p_holm") -> str:
    """"win" / "loss" when row[test] < alpha, by the sign of the mean difference (flipped when
    lower is better, e.g. forgetting); "ns" otherwise, including an untestable (NaN) row.

    Note: with 5 seeds the smallest two-sided Wilcoxon p is 2/2⁵ = 0.0625, so a Wilcoxon-based
    mark needs ≥ 6 matched seeds to ever say win/loss; the t-test default has no such floor.
    """
    p = row[test]
    if math.isnan(p) or p >= alpha or row["mean_diff"] == 0:
        return NS
    better = row["mean_diff"] > 0 if higher_is_better else row["mean_diff"] < 0
    return WIN if better else LOSS


# ---------------------------------------------------------------------------------------------
# Across settings: does a score predict an outcome?


def rank_correlation(scores: Sequence, outcomes: Sequence) -> dict:
    """Kendall's τ (τ-b, ties handled) and Spearman's ρ between scores[i] and outcomes[i] (one
    pair per setting), with scipy's two-sided p-values. Pairs with a missing side are dropped;
    with n < 3 or a constant side everything is NaN (no ranking to correlate)."""
    if len(scores) != len(outcomes):
        raise ValueError(f"rank_correlation: {len(scores)} scores, {len(outcomes)} outcomes")
    pairs = [(float(s), float(o)) for s, o in zip(scores, outcomes) if _present(s) and _present(o)]
    result = {"n": len(pairs), "kendall_tau": math.nan, "kendall_p": math.nan,
              "spearman_rho": math.nan, "spearman_p": math.nan}
    if len(pairs) < 3:
        return result
    x, y = np.array(pairs).T
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return result
    tau = stats.kendalltau(x, y)
    rho = stats.spearmanr(x, y)
    return result | {"kendall_tau": float(tau.statistic), "kendall_p": float(tau.pvalue),
                     "spearman_rho": float(rho.statistic), "spearman_p": float(rho.pvalue)}


def _present(value) -> bool:
    return value is not None and not math.isnan(float(value))


# ---------------------------------------------------------------------------------------------
# The stability–plasticity front: Pareto front and hypervolume in two objectives
#
# Points are (x, y) pairs; `maximize` says per axis whether larger is better (retention as source
# accuracy: yes; as source perplexity after transfer or as forgetting: no). Internally each axis is
# oriented so that larger is better.


def _oriented(points, maximize: tuple[bool, bool]) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return p * np.array([1.0 if maximize[0] else -1.0, 1.0 if maximize[1] else -1.0])


def pareto_front(points, maximize: tuple[bool, bool] = (True, True)) -> list[int]:
    """Indices of the non-dominated points, in input order. A point is dominated when another is
    at least as good on both axes and better on one; exact duplicates both stay on the front.
    Points with a NaN coordinate are never on it."""
    p = _oriented(points, maximize)
    ok = np.isfinite(p).all(axis=1)
    front = []
    for i in np.flatnonzero(ok):
        others = p[ok]
        dominated = np.any(np.all(others >= p[i], axis=1) & np.any(others > p[i], axis=1))
        if not dominated:
            front.append(int(i))
    return front


def hypervolume(points, reference, maximize: tuple[bool, bool] = (True, True)) -> float:
    """The area dominated by `points` and bounded by `reference` (2 objectives): the measure of
    the union of the boxes [reference, point] over the points better than the reference on both
    axes (the others add nothing). 0 for no such point."""
    p = _oriented(points, maximize)
    r = _oriented([reference], maximize)[0]
    p = p[np.isfinite(p).all(axis=1) & (p[:, 0] > r[0]) & (p[:, 1] > r[1])]
    if not len(p):
        return 0.0
    p = p[np.lexsort((-p[:, 1], -p[:, 0]))]  # x descending, then y descending
    area, top = 0.0, r[1]
    for x, y in p:  # sweeping from the right: each point adds the strip above what is covered
        if y > top:
            area += (x - r[0]) * (y - top)
            top = y
    return float(area)


def worst_point(points, maximize: tuple[bool, bool] = (True, True)) -> tuple[float, float]:
    """The worst observed value on each axis (the default hypervolume reference), in the data's units."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    p = p[np.isfinite(p).all(axis=1)]
    return (float(p[:, 0].min() if maximize[0] else p[:, 0].max()),
            float(p[:, 1].min() if maximize[1] else p[:, 1].max()))


def reference_is_valid(reference, points, maximize: tuple[bool, bool] = (True, True)) -> bool:
    """Whether every point is at least as good as `reference` on both axes (the reference bounds
    the data), so that no observed point is cut off by it."""
    p = _oriented(points, maximize)
    r = _oriented([reference], maximize)[0]
    p = p[np.isfinite(p).all(axis=1)]
    return bool(np.all(np.isfinite(r)) and np.all(p >= r))


def bootstrap_hypervolume(xs, ys, reference, maximize: tuple[bool, bool] = (True, True), reps: int = 2000,
                          confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """The hypervolume of one method's points with a percentile bootstrap interval over seeds.

    xs, ys: arrays (points × seeds) of per-seed values, NaN where a point has no run for a seed;
    column j is the same seed for every point. Each replicate draws the seeds with replacement
    (one draw of seed columns shared by all the method's points: a seed's runs stay together),
    takes each point's mean over the drawn seeds it has, and computes the hypervolume against the
    fixed `reference`. Returns {"hv": of the means over all seeds, "low", "high", "n_seeds", "reps"};
    no interval (NaN) with fewer than 2 seeds."""
    xs, ys = np.atleast_2d(np.asarray(xs, dtype=np.float64)), np.atleast_2d(np.asarray(ys, dtype=np.float64))
    present = np.isfinite(xs) & np.isfinite(ys)
    n_seeds = int(present.any(axis=0).sum())

    def means(weights: np.ndarray) -> np.ndarray:  # weights (seeds,) → (points, 2)
        w = present * weights
        total = w.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mx = np.where(present, xs, 0.0) @ weights / total
            my = np.where(present, ys, 0.0) @ weights / total
        return np.column_stack([mx, my])

    hv = hypervolume(means(np.ones(xs.shape[1])), reference, maximize)
    result = {"hv": hv, "low": math.nan, "high": math.nan, "n_seeds": n_seeds, "reps": 0}
    if n_seeds < 2:
        return result
    columns = np.flatnonzero(present.any(axis=0))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(columns), size=(reps, len(columns)))
    samples = np.empty(reps)
    for b in range(reps):
        weights = np.zeros(xs.shape[1])
        np.add.at(weights, columns[draws[b]], 1.0)
        samples[b] = hypervolume(means(weights), reference, maximize)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return result | {"low": float(low), "high": float(high), "reps": reps}


# ---------------------------------------------------------------------------------------------
# Aggregates across tasks (Agarwal et al., "Deep RL at the edge of the statistical precipice",
# NeurIPS 2021; the statistics of the `rliable` package, on numpy/scipy)
#
# A method's scores are a list with one 1-D array per task: that task's runs (one per seed),
# normalized so that higher is better and tasks are on one scale. Point estimates pool every run of
# every task; intervals are percentile intervals of a *stratified* bootstrap: each replicate
# redraws, within each task separately, as many runs as the task has (with replacement), so every
# replicate keeps each task's share. Draw order (for reproducibility): per replicate block, task by
# task, one rng.integers(0, n_task, (reps, n_task)) call.


def iqm(values) -> float:
    """Interquartile mean: the mean of the middle 50% of the values (scipy's trim_mean with 25%
    cut from each end: ⌊n/4⌋ values dropped at each end)."""
    x = finite(np.ravel(values))
    return float(stats.trim_mean(x, 0.25)) if len(x) else math.nan


def _stratified_draws(scores: Sequence, reps: int, rng: np.random.Generator) -> np.ndarray:
    """(reps, total runs): every replicate's resampled runs, task by task."""
    return np.concatenate([np.asarray(s, dtype=np.float64)[rng.integers(0, len(s), size=(reps, len(s)))]
                           for s in scores], axis=1)


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    return low, high


def aggregate_interval(scores: Sequence, statistic: str = "iqm", reps: int = 2000,
                       confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """statistic ("iqm" or "mean") of a method's runs pooled over tasks, with a stratified
    bootstrap percentile interval. scores: one array of runs per task (empty tasks dropped).
    Returns {"value", "low", "high", "n_runs", "n_tasks"}; no interval when every task has one run."""
    scores = [finite(s) for s in scores]
    scores = [s for s in scores if len(s)]
    pooled = np.concatenate(scores) if scores else np.array([])
    fn = {"iqm": lambda a: stats.trim_mean(a, 0.25, axis=-1), "mean": lambda a: np.mean(a, axis=-1)}[statistic]
    result = {"value": float(fn(pooled)) if len(pooled) else math.nan, "low": math.nan, "high": math.nan,
              "n_runs": len(pooled), "n_tasks": len(scores)}
    if not scores or max(len(s) for s in scores) < 2:
        return result
    samples = fn(_stratified_draws(scores, reps, np.random.default_rng(seed)))
    low, high = _percentile_interval(samples, confidence)
    return result | {"low": float(low), "high": float(high)}


def _poi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) + ½P(X = Y) over the last two axes' pairs: x (..., n), y (..., m) → (...)."""
    diff = x[..., :, None] - y[..., None, :]
    return ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(-1, -2))


def probability_of_improvement(x_scores: Sequence, y_scores: Sequence, reps: int = 2000,
                               confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """P(X > Y): the probability that a run of method X beats a run of method Y on a task drawn at
    random — per task the Mann–Whitney U statistic over N·M (ties count ½), averaged over the tasks
    both have runs on; a stratified bootstrap interval (X's and Y's runs redrawn within each task).
    x_scores, y_scores: one array of runs per task, aligned by task."""
    pairs = [(finite(x), finite(y)) for x, y in zip(x_scores, y_scores)]
    pairs = [(x, y) for x, y in pairs if len(x) and len(y)]
    result = {"value": math.nan, "low": math.nan, "high": math.nan, "n_tasks": len(pairs)}
    if not pairs:
        return result
    result["value"] = float(np.mean([_poi(x, y) for x, y in pairs]))
    if max(max(len(x), len(y)) for x, y in pairs) < 2:
        return result
    rng = np.random.default_rng(seed)
    per_task = []
    for x, y in pairs:
        xb = x[rng.integers(0, len(x), size=(reps, len(x)))]
        yb = y[rng.integers(0, len(y), size=(reps, len(y)))]
        per_task.append(_poi(xb, yb))
    low, high = _percentile_interval(np.mean(per_task, axis=0), confidence)
    return result | {"low": float(low), "high": float(high)}


def performance_profile(scores: Sequence, taus, reps: int = 2000, confidence: float = CONFIDENCE,
                        seed: int = 0) -> dict:
    """The run-score distribution: for each threshold τ, the fraction of runs scoring above τ —
    per task, then averaged over tasks (each task weighs the same, whatever its number of runs) —
    with a stratified bootstrap band. Returns {"taus", "profile", "low", "high"} (arrays)."""
    taus = np.asarray(taus, dtype=np.float64)
    scores = [finite(s) for s in scores]
    scores = [s for s in scores if len(s)]
    nan = np.full(len(taus), math.nan)
    if not scores:
        return {"taus": taus, "profile": nan, "low": nan, "high": nan}
    profile = np.mean([(s[:, None] > taus).mean(axis=0) for s in scores], axis=0)
    if max(len(s) for s in scores) < 2:
        return {"taus": taus, "profile": profile, "low": nan, "high": nan}
    rng = np.random.default_rng(seed)
    per_task = [(s[rng.integers(0, len(s), size=(reps, len(s)))][:, :, None] > taus).mean(axis=1) for s in scores]
    low, high = _percentile_interval(np.mean(per_task, axis=0), confidence)
    return {"taus": taus, "profile": profile, "low": low, "high": high}
