"""The stability–plasticity front: Pareto front and hypervolume against independent computations,
the bootstrap over seeds, the reference point rule, lower-is-better axes (perplexity, forgetting
in perplexity), and the report section + figure on a synthetic methods × knobs sweep."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import yaml

from test_evidence import LM_TASK, section
from test_report import PNG_MAGIC, make_config
from transferlab import front, report, stats


def union_area(points, reference, maximize):
    """The area of the union of the boxes [reference, point], by coordinate compression: every
    elementary cell between consecutive coordinates counts once when some box covers it."""
    sign = np.array([1 if m else -1 for m in maximize], dtype=float)
    p = np.asarray(points, dtype=float) * sign
    r = np.asarray(reference, dtype=float) * sign
    p = p[(p[:, 0] > r[0]) & (p[:, 1] > r[1])]
    xs, ys = sorted({r[0], *p[:, 0]}), sorted({r[1], *p[:, 1]})
    area = 0.0
    for (x0, x1), (y0, y1) in itertools.product(zip(xs, xs[1:]), zip(ys, ys[1:])):
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if any(cx < px and cy < py for px, py in p):
            area += (x1 - x0) * (y1 - y0)
    return area


def dominated_brute(points, maximize):
    sign = np.array([1 if m else -1 for m in maximize], dtype=float)
    p = np.asarray(points, dtype=float) * sign
    return [i for i in range(len(p))
            if not any((p[j] >= p[i]).all() and (p[j] > p[i]).any() for j in range(len(p)) if j != i)]


@pytest.mark.parametrize("maximize", [(True, True), (False, True), (True, False), (False, False)])
def test_pareto_front_and_hypervolume_match_brute_force(maximize):
    rng = np.random.default_rng(1)
    for _ in range(20):
        pts = rng.normal(size=(rng.integers(1, 12), 2)).round(1)  # rounding makes ties and duplicates
        assert stats.pareto_front(pts, maximize) == dominated_brute(pts, maximize)
        ref = stats.worst_point(pts, maximize)
        assert stats.hypervolume(pts, ref, maximize) == pytest.approx(union_area(pts, ref, maximize), abs=1e-12)
        far = tuple(v - 1 if m else v + 1 for v, m in zip(ref, maximize))
        assert stats.hypervolume(pts, far, maximize) == pytest.approx(union_area(pts, far, maximize), abs=1e-12)


def test_reference_rule_and_bootstrap_over_seeds():
    pts = [(0.9, 0.7), (0.8, 0.8)]
    assert stats.reference_is_valid((0.5, 0.5), pts) and not stats.reference_is_valid((0.85, 0.5), pts)
    assert stats.reference_is_valid((12.0, 30.0), [(10.0, 20.0)], (False, False))
    # two points × three seeds; the point estimate is the HV of the per-point means
    xs = np.array([[0.9, 0.8, 1.0], [0.7, 0.75, 0.8]])
    ys = np.array([[0.5, 0.6, 0.7], [0.9, 0.8, 1.0]])
    hv = stats.bootstrap_hypervolume(xs, ys, (0.0, 0.0), reps=500, seed=3)
    assert hv["hv"] == pytest.approx(union_area(np.column_stack([xs.mean(1), ys.mean(1)]), (0, 0), (True, True)))
    assert hv["low"] <= hv["hv"] <= hv["high"] and hv["n_seeds"] == 3
    # independent replay: the same seed draws, each replicate's means and union area by hand
    draws = np.random.default_rng(3).integers(0, 3, size=(500, 3))
    samples = [union_area(np.column_stack([xs[:, d].mean(1), ys[:, d].mean(1)]), (0, 0), (True, True)) for d in draws]
    assert (hv["low"], hv["high"]) == pytest.approx(tuple(np.percentile(samples, [2.5, 97.5])))
    one = stats.bootstrap_hypervolume(xs[:, :1], ys[:, :1], (0.0, 0.0))
    assert one["n_seeds"] == 1 and np.isnan(one["low"])  # one seed: no interval


def lm_knob_sweep(root):
    """A language-model sweep: arms none/l2sp × alpha, perplexity (lower is better) on the target,
    source perplexity after (lower is better) as retention."""
    job = 0
    for arm, alphas in (("none", [None]), ("l2sp", [0.01, 1.0])):
        for alpha in alphas:
            for seed in range(3):
                ppl = {None: 20.0, 0.01: 19.0, 1.0: 24.0}[alpha] + seed
                after = {None: 14.0, 0.01: 13.0, 1.0: 10.5}[alpha] + 0.1 * seed
                folder = root / str(job)
                (folder / ".hydra").mkdir(parents=True)
                overrides = [f"+ablation/baselines={arm}", *([f"regularizer.alpha={alpha}"] if alpha else []), f"seed={seed}"]
                (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
                metrics = {"target/test_ppl": ppl, "target/val_ppl": ppl, "source/test_ppl_before": 10.0,
                           "source/test_ppl_after": after, "transfer/forgetting": after - 10.0}
                (folder / "results.json").write_text(json.dumps(
                    {"status": "completed", "metrics": metrics, "config": make_config(seed=seed), "task": LM_TASK}))
                job += 1


def test_front_section_for_perplexity_with_a_bad_reference(tmp_path):
    lm_knob_sweep(tmp_path)
    written = report.write_report(tmp_path, front_reference=(12.0, 30.0))
    md = written["report.md"].read_text()
    part = section(md, "Stability–plasticity front")
    assert "target/test_ppl (lower is better)" in part and "source/test_ppl_after (lower is better)" in part
    # (12, 30) would cut off the none arm (source ppl 14.1 > 12): said, and the worst observed used
    assert "The given reference (12, 30) is inside the data" in part
    worst = (14.1, 25.0)  # the worst mean source ppl after (none) and target ppl (l2sp alpha=1)
    assert f"({worst[0]:.4g}, {worst[1]:.4g})" in part
    # front: l2sp alpha=0.01 (19+1, 13.1) beats none (21, 14.1) on both; alpha=1 keeps the most
    rows = {ln.split("|")[2].strip(): ln for ln in part.splitlines() if ln.startswith("| none |") or ln.startswith("| l2sp |")}
    assert "**yes**" in rows["regularizer.alpha=0.01"] and "**yes**" in rows["regularizer.alpha=1.0"]
    assert "**yes**" not in rows["(default)"]
    # HV of l2sp against the worst observed (lower is better on both axes)
    means = [(13.1, 20.0), (10.6, 25.0)]
    hv = union_area(means, worst, (False, False))
    assert f"| l2sp | 2 | {hv:.4g} |" in part
    assert "| none | 1 | 0 |" in part  # the worst on both axes: nothing beyond the reference
    png = written["plots/front_target_test_ppl_vs_source_test_ppl_after.png"]
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert written["plots/front_target_test_ppl_vs_source_test_ppl_after.pdf"].read_bytes()[:5] == b"%PDF-"


def test_forgetting_is_the_retention_axis_without_a_source_metric(tmp_path):
    lm_knob_sweep(tmp_path)
    runs = report.load_runs(tmp_path)
    for r in runs:
        del r["metrics"]["source/test_ppl_after"], r["metrics"]["source/test_ppl_before"]
    assert front.retention_key(runs) == "transfer/forgetting"
    lines = front.front_section(report.assign_settings(runs), tmp_path / "plots", tmp_path)
    assert "retention transfer/forgetting (lower is better)" in "\n".join(lines)
