"""Tune each arm, then compare (transferlab.tuning) on synthetic sweeps: selection on mean validation
over the selection seeds only (never test), in the task's direction; seeds kept apart; an arm with
no complete grid point named and left out; the comparison uses each arm's selected setting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from test_evidence import section
from test_report import make_config
from transferlab import report, stats, tuning

GRIDS = {"none": [{}], "l2": [{"regularizer.alpha": a} for a in (0.01, 0.1)],
         "l2sp": [{"regularizer.alpha": a} for a in (0.01, 0.1, 1)]}


def write(root, job, arm, knobs, seed, val, test, status="completed", task=None, extra=None):
    folder = root / str(job)
    (folder / ".hydra").mkdir(parents=True)
    overrides = [f"+ablation/regularizer={arm}", *(f"{k}={v}" for k, v in knobs.items()), f"seed={seed}"]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    key = (task or {}).get("primary_metric", "acc")
    metrics = {} if status != "completed" else {f"target/val_{key}": val, f"target/test_{key}": test, **(extra or {})}
    (folder / "results.json").write_text(json.dumps(
        {"status": status, "error": None if status == "completed" else "boom", "metrics": metrics,
         "config": make_config(seed=seed), "task": task or {"primary_metric": "acc", "higher_is_better": True}}))


def sweep(root, seeds, val_of, test_of, status_of=lambda arm, knobs, seed: "completed", task=None):
    job = 0
    for arm, grid in GRIDS.items():
        for knobs in grid:
            for seed in seeds:
                write(root, job, arm, knobs, seed, val_of(arm, knobs, seed), test_of(arm, knobs, seed),
                      status_of(arm, knobs, seed), task)
                job += 1


def table_row(text: str, first: str) -> list[str]:
    """The cells of the first table row of `text` that starts with `first`."""
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {first} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def runs_of(root):
    return report.add_gains(report.assign_settings(report.load_runs(root)))


def test_selection_is_on_mean_validation_of_the_selection_seeds_never_test(tmp_path):
    # l2sp: alpha=0.1 has the best validation on seeds 0-2 but the worst test; alpha=1 the best test.
    # Seeds 3-5 (comparison) make alpha=1 the best on validation too: selection must not see them.
    def val(arm, knobs, seed):
        a = knobs.get("regularizer.alpha")
        return {0.1: 0.80, 1: 0.70}.get(a, 0.75) + 0.001 * seed if seed < 3 else {1: 0.95}.get(a, 0.5)

    def held_out_score(arm, knobs, seed):
        return {0.1: 0.60, 1: 0.99}.get(knobs.get("regularizer.alpha"), 0.70) + 0.01 * seed

    sweep(tmp_path, range(6), val, held_out_score)
    runs = runs_of(tmp_path)
    assert tuning.is_tuning_sweep(runs)
    arms, knobs = tuning.arms_and_grids(runs)
    assert list(arms) == ["none", "l2", "l2sp"] and knobs == ["regularizer.alpha"]
    sel, comp, how = tuning.split_seeds(arms)
    assert (sel, comp) == ([0, 1, 2], [3, 4, 5]) and "DomainBed" in how
    curve = tuning.select(arms["l2sp"], sel, "target/val_acc", higher=True)
    assert curve["selected"]["grid"] == "regularizer.alpha=0.1"
    # independent: the mean validation over seeds 0-2 of every grid point
    means = {a: np.mean([{0.1: 0.80, 1: 0.70}.get(a, 0.75) + 0.001 * s for s in range(3)]) for a in (0.01, 0.1, 1)}
    assert curve["selected"]["mean"] == pytest.approx(means[0.1])
    assert curve["spread"] == pytest.approx(max(means.values()) - min(means.values()))

    md = report.write_report(tmp_path)["report.md"].read_text()
    part = section(md, "Tuned per arm, then compared")
    assert table_row(part, "l2sp")[2] == "`regularizer.alpha=0.1`"
    # the comparison uses the selected setting's test runs on seeds 3-5 only
    expected = stats.mean_ci([0.60 + 0.01 * s for s in (3, 4, 5)])
    test_table = part.split("**target/test_acc**")[1]
    cells = table_row(test_table, "l2sp")
    assert cells[2] == "3" and cells[3] == f"{expected['mean']:.4f} ± {expected['ci']:.4f}"
    d = stats.paired_comparison({s: 0.60 + 0.01 * s for s in (3, 4, 5)}, {s: 0.70 + 0.01 * s for s in (3, 4, 5)})
    assert cells[4].startswith(f"{d['mean_diff']:+.4f}")


def test_lower_is_better_selects_the_smallest_validation(tmp_path):
    task = {"primary_metric": "ppl", "higher_is_better": False}
    sweep(tmp_path, range(2), lambda arm, k, s: {0.01: 20.0, 0.1: 12.0, 1: 15.0}.get(k.get("regularizer.alpha"), 18.0) + s,
          lambda arm, k, s: 30.0, task=task)
    arms, _ = tuning.arms_and_grids(runs_of(tmp_path))
    sel, comp, how = tuning.split_seeds(arms)
    assert sel == comp == [0, 1] and "reuse the same seeds" in how
    assert tuning.select(arms["l2sp"], sel, "target/val_ppl", higher=False)["selected"]["grid"] == "regularizer.alpha=0.1"
    assert tuning.select(arms["l2sp"], sel, "target/val_ppl", higher=True)["selected"]["grid"] == "regularizer.alpha=0.01"


def test_second_phase_seeds_are_the_comparison_seeds(tmp_path):
    sweep(tmp_path, range(3), lambda a, k, s: 0.7, lambda a, k, s: 0.7)
    job = 100
    for arm, knobs in (("none", {}), ("l2", {"regularizer.alpha": 0.01}), ("l2sp", {"regularizer.alpha": 0.01})):
        for seed in (10, 11):
            write(tmp_path, job, arm, knobs, seed, 0.7, 0.8)
            job += 1
    arms, _ = tuning.arms_and_grids(runs_of(tmp_path))
    assert tuning.split_seeds(arms)[:2] == ([0, 1, 2], [10, 11])
    assert tuning.split_seeds(arms, "0-1")[:2] == ([0, 1], [2, 10, 11])
    assert tuning.split_seeds(arms, "all")[:2] == ([0, 1, 2, 10, 11],) * 2


def test_an_arm_with_no_complete_grid_point_is_named_and_the_rest_compared(tmp_path):
    # every l2 grid point lost a selection seed to a failure (e.g. divergence): no complete setting
    sweep(tmp_path, range(4), lambda a, k, s: 0.7 + 0.01 * s, lambda a, k, s: 0.8 + 0.01 * s,
          status_of=lambda arm, knobs, seed: "failed" if arm == "l2" and seed == 1 else "completed")
    md = report.write_report(tmp_path)["report.md"].read_text()
    part = section(md, "Tuned per arm, then compared")
    assert table_row(part, "l2")[2] == "**none complete**"
    assert "left out of the comparison: `l2`" in part
    test_table = part.split("**target/test_acc**")[1]
    assert [ln.split("|")[1].strip() for ln in test_table.splitlines() if ln.startswith("| l2")] == ["l2sp"]
    # its incomplete points say which selection seed is missing
    assert table_row(part, "l2")[0] == "l2"
    assert "| l2 | regularizer.alpha=0.01 | " in part and part.count("| 1 |") >= 2


def test_auto_mode_is_off_without_knobs_and_forced_by_the_flag(tmp_path):
    for seed in range(2):
        for arm in ("none", "l2sp"):
            write(tmp_path, f"{arm}{seed}", arm, {}, seed, 0.7, 0.8)
    runs = runs_of(tmp_path)
    assert not tuning.is_tuning_sweep(runs)
    assert "## Tuned per arm" not in report.write_report(tmp_path)["report.md"].read_text()
    assert "## Tuned per arm" in report.write_report(tmp_path, tune=True)["report.md"].read_text()


def test_label_budget_is_not_a_knob():
    assert tuning.is_knob("regularizer.alpha") and tuning.is_knob("target.lr") and tuning.is_knob("freeze.k")
    assert not tuning.is_knob("data.target_train_size") and not tuning.is_knob("source.epochs")
    assert not tuning.is_knob("regularizer._target_") and not tuning.is_knob("regularizer")
    assert tuning.is_knob("data.target_train_size", ["data.target_train_size"])
    assert tuning.parse_seeds("0-2,7") == [0, 1, 2, 7]
