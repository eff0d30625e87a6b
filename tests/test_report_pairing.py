"""The report's headline metric follows results.json's task block (entity F1 for a token-
classification sweep, accuracy for old runs without it), and the Pairing section says, per
setting, which scratch run was used, by which rule, and why a run has none."""

from __future__ import annotations

import csv
import json

import pytest

from test_report import analyse, expected, make_config, md_cells, write_job
from transferlab import report

F1_TASK = {"kind": "token_classification", "primary_metric": "f1", "majority_test": None}


def write_ner_job(root, name, *, f1, token_acc, seed, source="train", overrides=None):
    """A WNUT-16-like job by hand: entity F1 is the headline, token accuracy is much higher."""
    scratch = source == "scratch"
    metrics = {"target/test_f1": f1, "target/val_f1": f1 - 0.01, "target/test_acc": token_acc,
               "target/val_acc": token_acc, "transfer/forgetting": None if scratch else 0.02}
    job = write_job(root, name, config=make_config(seed=seed, source=source), metrics=metrics,
                    overrides=overrides or [f"source={source}", f"seed={seed}"])
    results = json.loads((job / "results.json").read_text())
    (job / "results.json").write_text(json.dumps(results | {"task": F1_TASK}))
    return job


def test_an_f1_task_reports_entity_f1_and_the_gain_in_f1(tmp_path):
    transfer_f1, scratch_f1 = [0.42, 0.45, 0.40], [0.30, 0.36, 0.31]
    for seed in range(3):
        write_ner_job(tmp_path, f"t{seed}", f1=transfer_f1[seed], token_acc=0.93, seed=seed)
        write_ner_job(tmp_path, f"s{seed}", f1=scratch_f1[seed], token_acc=0.95, seed=seed, source="scratch")
    runs, rows = analyse(tmp_path)
    row = rows["source=train"]
    assert row["metric_names"] == ["target/test_f1", "target/val_f1", "transfer/forgetting", "transfer/gain"]
    mean, std, ci = expected(transfer_f1)
    assert row["target/test_f1"]["mean"] == pytest.approx(mean) and row["target/test_f1"]["ci"] == pytest.approx(ci)
    gain_mean, _, gain_ci = expected([t - s for t, s in zip(transfer_f1, scratch_f1)])  # not token accuracy
    assert row["transfer/gain"]["mean"] == pytest.approx(gain_mean) and row["transfer/gain"]["ci"] == pytest.approx(gain_ci)
    assert "target/test_acc" not in row

    written = report.write_report(tmp_path)
    md = written["report.md"].read_text()
    assert md_cells(report.markdown_table(list(rows.values())), "source=train")["target/test_f1"] == f"{mean:.4f} ± {ci:.4f}"
    assert f"| source=train | 3 | {mean:.4f} ± {ci:.4f} |" in md
    assert "transfer/gain: target/test_f1 minus" in md
    csv_row = {r["setting"]: r for r in csv.DictReader(written["report.csv"].open())}["source=train"]
    assert float(csv_row["transfer/gain_mean"]) == pytest.approx(gain_mean) and "target/test_acc_mean" not in csv_row
    assert "Target test F1 & Target val.\\ F1 & Forgetting & Transfer gain" in written["report.tex"].read_text()
    assert "plots/tradeoff_forgetting_vs_target_test_f1.png" in written


def test_runs_without_a_task_block_count_as_accuracy(tmp_path):
    for seed in range(2):
        write_job(tmp_path, f"t{seed}", test_acc=0.8, config=make_config(seed=seed), overrides=["source=train", f"seed={seed}"])
        write_job(tmp_path, f"s{seed}", test_acc=0.7, config=make_config(seed=seed, source="scratch"),
                  overrides=["source=scratch", f"seed={seed}"])
    runs, rows = analyse(tmp_path)
    assert rows["source=train"]["metric_names"] == report.METRICS
    assert rows["source=train"]["transfer/gain"]["mean"] == pytest.approx(0.1)


def pairing_lines(runs) -> dict:
    """{setting: its line of the Pairing section}."""
    return {line.split("`")[1]: line for line in report.pairing_section(runs) if line.startswith("- `")}


def test_pairing_section_names_the_scratch_setting_and_the_rule(tmp_path):
    # Scratch arms swept over target.lr: a transfer run at lr 0.01 pairs with the lr-0.01 arm
    # (same recipe), one at lr 0.1 has no same-recipe arm and takes the plain baseline... which
    # here is the first arm of the matching ones (all are FullFinetune + NoRegularizer).
    job = 0
    for seed in range(2):
        for lr in (0.001, 0.01):
            write_job(tmp_path, str(job), test_acc=0.5 + lr, config=make_config(seed=seed, source="scratch", target__lr=lr),
                      overrides=["source=scratch", f"target.lr={lr}", f"seed={seed}"])
            job += 1
        for lr in (0.01, 0.1):
            write_job(tmp_path, str(job), test_acc=0.9, config=make_config(seed=seed, target__lr=lr),
                      overrides=["source=train", f"target.lr={lr}", f"seed={seed}"])
            job += 1
    # seed 2 has transfer runs but no scratch run at all
    write_job(tmp_path, str(job), test_acc=0.9, config=make_config(seed=2, target__lr=0.01),
              overrides=["source=train", "target.lr=0.01", "seed=2"])
    runs, rows = analyse(tmp_path)
    by_name = {r["name"]: r for r in runs}
    assert (by_name["2"]["scratch"], by_name["2"]["pairing"], by_name["2"]["candidates"]) == ("1", "same recipe", 2)
    assert by_name["3"]["scratch"] == "0" and by_name["3"]["pairing"] == "plain baseline"
    assert by_name["3"]["metrics"]["transfer/gain"] == pytest.approx(0.9 - 0.501)
    assert by_name["8"]["scratch"] is None and by_name["8"]["pairing"] == "no scratch run for seed"
    lines = pairing_lines(runs)
    assert lines["source=train target.lr=0.01"] == (
        "- `source=train target.lr=0.01`: 2/3 paired: ×2 with `source=scratch target.lr=0.01` (same recipe); "
        "2 matching scratch runs each; unpaired: no scratch run for seed 2")
    assert lines["source=train target.lr=0.1"] == (
        "- `source=train target.lr=0.1`: 2/2 paired: ×2 with `source=scratch target.lr=0.001` (plain baseline); "
        "2 matching scratch runs each")
    assert not any("source=scratch" in label for label in lines)  # scratch settings are not paired
    # The lr-0.01 scratch run of seed 1 fails: that seed falls back to the plain baseline, another
    # scratch setting, and the section says the setting's gains mix baselines.
    results = json.loads((tmp_path / "5" / "results.json").read_text())
    (tmp_path / "5" / "results.json").write_text(json.dumps(results | {"status": "failed", "error": "x"}))
    runs, _ = analyse(tmp_path)
    assert pairing_lines(runs)["source=train target.lr=0.01"] == (
        "- `source=train target.lr=0.01`: 2/3 paired: ×1 with `source=scratch target.lr=0.01` (same recipe), "
        "×1 with `source=scratch target.lr=0.001` (plain baseline); 1–2 matching scratch runs each; "
        "**mixed scratch settings**: its gains compare against different baselines; unpaired: no scratch run for seed 2")
    md = report.write_report(tmp_path)["report.md"].read_text()
    assert "## Pairing" in md and md.index("## Pairing") < md.index("## Failed jobs")
    assert "**same recipe** (every `target.*`, `freeze.*` and `regularizer.*` value equal)" in md


def test_unpaired_for_other_data_is_said_per_setting_and_long_lists_are_cut(tmp_path):
    for seed in range(14):
        write_job(tmp_path, f"t{seed}", config=make_config(seed=seed, budget=50), overrides=["budget=50", f"seed={seed}"])
        write_job(tmp_path, f"s{seed}", config=make_config(seed=seed, budget=100, source="scratch"),
                  overrides=["budget=100", f"seed={seed}"])
    runs, _ = analyse(tmp_path)
    assert pairing_lines(runs)["budget=50"] == ("- `budget=50`: 0/14 paired; unpaired: no scratch run with this "
                                                "target data, backbone and label budget (14 runs)")
    [listed] = [line for line in report.legend(runs) if line.startswith("Unpaired")]
    assert listed.endswith(": t0, t1, t2, t3, t4, t5, t6, t7, t8, t9 and 4 more (why, per setting: see Pairing).")
