"""The ablation report on synthetic sweeps (results.json + .hydra/overrides.yaml written here, no
training): statistics against numpy/scipy, transfer-gain pairing, negative-transfer flag, failed
and running jobs, nulls, n=1, the config-diff fallback, the files written, and the CLI entry."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import yaml
from scipy import stats

from transferlab import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_config(seed=0, source="train", regularizer="none", freeze="full", budget=None, **changes) -> dict:
    """A resolved config shaped like the real one (see results.json of any run)."""
    regularizers = {
        "none": {"_target_": "transferlab.regularizers.none.NoRegularizer"},
        "l2sp": {"_target_": "transferlab.regularizers.l2sp.L2SP", "alpha": 0.1, "beta": 0.01},
        "ewc": {"_target_": "transferlab.regularizers.ewc.EWC", "lam": 100.0, "fisher": False,
                "normalize": "none", "seed": seed},
    }
    freezes = {"full": {"_target_": "transferlab.freeze.full.FullFinetune"},
               "partial": {"_target_": "transferlab.freeze.partial.PartialFreeze", "k": 1}}
    config = {
        "seed": seed,
        "name": "default",
        "data": {"dataset": {"_target_": "transferlab.data.digits.load_digits"},
                 "source_classes": [0, 1, 2, 3, 4], "target_classes": [5, 6, 7, 8, 9],
                 "val_fraction": 0.15, "test_fraction": 0.2, "source_train_size": None,
                 "target_train_size": budget, "split_seed": None},
        "backbone": {"_target_": "transferlab.backbones.cnn.SmallCNN", "channels": [32, 64, 128]},
        "freeze": freezes[freeze],
        "regularizer": regularizers[regularizer],
        "source": {"mode": source, "epochs": 1, "lr": 0.001, "weight_decay": 0.0, "batch_size": 32, "path": None},
        "target": {"epochs": 1, "lr": 0.001, "weight_decay": 0.0, "batch_size": 32, "early_stopping_patience": None},
        "trainer": {"accelerator": "cpu", "devices": 1, "deterministic": True},
        "logger": {"backend": "csv", "tags": []},
        "paths": {"output_root": "outputs"},
    }
    for dotted, value in changes.items():  # e.g. target__lr=0.01
        *parents, leaf = dotted.split("__")
        node = config
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config


def write_job(root, name, *, test_acc=0.9, val_acc=None, forgetting="auto", status="completed", error=None,
              config=None, overrides=None, metrics=None):
    """One job directory: results.json (+ .hydra/overrides.yaml when overrides is given)."""
    config = config or make_config()
    scratch = config["source"]["mode"] == "scratch"
    if metrics is None:
        metrics = {"target/test_acc": test_acc, "target/val_acc": test_acc if val_acc is None else val_acc,
                   "source/test_acc_before": None if scratch else 0.99,
                   "source/test_acc_after": None if scratch else 0.95,
                   "transfer/forgetting": (None if scratch else 0.04) if forgetting == "auto" else forgetting,
                   "params/total": 1000, "params/trainable": 1000}
    job = root / name
    job.mkdir(parents=True)
    (job / "results.json").write_text(json.dumps(
        {"status": status, "error": error, "metrics": metrics, "config": config, "provenance": {}}))
    if overrides is not None:
        (job / ".hydra").mkdir()
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    return job


def analyse(root):
    """What write_report computes, without writing: (runs with settings and gains, rows by label)."""
    runs = report.add_gains(report.assign_settings(report.load_runs(root)))
    return runs, {row["setting"]: row for row in report.summarize_settings(runs)}


def expected(values):
    values = np.asarray(values, dtype=float)
    n = len(values)
    std = values.std(ddof=1)
    return values.mean(), std, stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)


def md_cells(table: str, setting: str) -> dict:
    """{column header: cell} of the Markdown table row of one setting."""
    lines = table.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    [row] = [line for line in lines if line.startswith(f"| {setting} |")]
    return dict(zip(header, (cell.strip() for cell in row.strip("|").split("|"))))


def gain_of(runs, name):
    [run] = [r for r in runs if r["name"] == name]
    return run["scratch"], run["metrics"].get("transfer/gain")


# ---------------------------------------------------------------------------------------------
# Statistics


def test_means_stds_and_cis_equal_numpy_scipy(tmp_path):
    accs = {"none": [0.81, 0.86, 0.90], "l2sp": [0.70, 0.75, 0.79, 0.93]}
    vals = {"none": [0.80, 0.82, 0.95], "l2sp": [0.71, 0.72, 0.73, 0.90]}
    forget = {"none": [0.10, 0.02, 0.05], "l2sp": [0.01, 0.00, 0.03, 0.02]}
    job = 0
    for reg in accs:
        for seed, (acc, val, fg) in enumerate(zip(accs[reg], vals[reg], forget[reg])):
            write_job(tmp_path, str(job), test_acc=acc, val_acc=val, forgetting=fg,
                      config=make_config(seed=seed, regularizer=reg),
                      overrides=[f"regularizer={reg}", f"seed={seed}", "debug=fast"])
            job += 1
    _, rows = analyse(tmp_path)
    assert list(rows) == ["regularizer=none", "regularizer=l2sp"]
    for reg in accs:
        row = rows[f"regularizer={reg}"]
        assert row["n"] == row["completed"] == len(accs[reg])
        for metric, values in [("target/test_acc", accs[reg]), ("target/val_acc", vals[reg]),
                               ("transfer/forgetting", forget[reg])]:
            mean, std, ci = expected(values)
            assert row[metric]["n"] == len(values)
            assert row[metric]["mean"] == pytest.approx(mean, rel=1e-12)
            assert row[metric]["std"] == pytest.approx(std, rel=1e-12)
            assert row[metric]["ci"] == pytest.approx(ci, rel=1e-12)
    # The t quantile, not 1.96: with n=3 the half-width is 4.30 std/sqrt(n).
    row = rows["regularizer=none"]["target/test_acc"]
    assert row["ci"] == pytest.approx(4.302653 * row["std"] / math.sqrt(3), rel=1e-6)


def test_null_metrics_are_skipped_not_zero(tmp_path):
    for seed, fg in enumerate([0.10, None, 0.30]):
        write_job(tmp_path, f"t{seed}", forgetting=fg, config=make_config(seed=seed),
                  overrides=["source=train", f"seed={seed}"])
    for seed in range(2):
        write_job(tmp_path, f"s{seed}", config=make_config(seed=seed, source="scratch"),
                  overrides=["source=scratch", f"seed={seed}"])
    _, rows = analyse(tmp_path)
    forgetting = rows["source=train"]["transfer/forgetting"]
    assert forgetting["n"] == 2 and forgetting["mean"] == pytest.approx(0.20)
    assert rows["source=train"]["n"] == 3  # the null is one metric missing, not a run missing
    scratch = rows["source=scratch"]["transfer/forgetting"]
    assert scratch["n"] == 0 and math.isnan(scratch["mean"])
    md = report.markdown_table(list(rows.values()))
    assert md_cells(md, "source=scratch")["transfer/forgetting"] == "—"
    mean, _, ci = expected([0.10, 0.30])
    assert md_cells(md, "source=train")["transfer/forgetting"] == f"{mean:.4f} ± {ci:.4f} (n=2)"


def results_table_row(md: str, setting: str) -> str:
    """The setting's row of the results table (report.md's first table; the evidence sections
    below it have rows per setting too)."""
    table = md.split("\n\n")[1]
    [line] = [l for l in table.splitlines() if l.startswith(f"| {setting} |")]
    return line


def test_single_run_has_no_std_or_ci(tmp_path):
    write_job(tmp_path, "0", test_acc=0.77, config=make_config(regularizer="l2sp"),
              overrides=["regularizer=l2sp", "seed=0"])
    write_job(tmp_path, "1", test_acc=0.80, overrides=["regularizer=none", "seed=0"])
    write_job(tmp_path, "2", test_acc=0.82, config=make_config(seed=1), overrides=["regularizer=none", "seed=1"])
    out = tmp_path / "out"
    report.write_report(tmp_path, out)
    _, rows = analyse(tmp_path)
    single = rows["regularizer=l2sp"]["target/test_acc"]
    assert single["n"] == 1 and single["mean"] == pytest.approx(0.77)
    assert math.isnan(single["std"]) and math.isnan(single["ci"])
    line = results_table_row((out / "report.md").read_text(), "regularizer=l2sp")
    assert "0.7700" in line and "±" not in line
    [csv_row] = [r for r in csv.DictReader((out / "report.csv").open()) if r["setting"] == "regularizer=l2sp"]
    assert csv_row["target/test_acc_std"] == "" and csv_row["target/test_acc_ci"] == ""
    assert float(csv_row["target/test_acc_mean"]) == pytest.approx(0.77)


# ---------------------------------------------------------------------------------------------
# Settings


def test_override_settings_drop_seed_and_shared_overrides(tmp_path):
    for i, (reg, src, seed) in enumerate([("none", "train", 0), ("none", "train", 1), ("l2sp", "scratch", 0)]):
        write_job(tmp_path, str(i), config=make_config(seed=seed, source=src, regularizer=reg),
                  overrides=[f"regularizer={reg}", f"source={src}", f"seed={seed}", "debug=fast"])
    runs, rows = analyse(tmp_path)
    assert list(rows) == ["regularizer=none source=train", "regularizer=l2sp source=scratch"]
    assert rows["regularizer=none source=train"]["n"] == 2
    assert runs[2]["params"] == {"regularizer": "l2sp", "source": "scratch"}


def test_config_diff_fallback_without_overrides_yaml(tmp_path):
    # name differs in every run and regularizer.seed follows seed: neither may split the groups.
    jobs = [("ewc", 0.001, 0), ("ewc", 0.001, 1), ("ewc", 0.01, 0), ("none", 0.001, 0), ("none", 0.001, 1)]
    for i, (reg, lr, seed) in enumerate(jobs):
        write_job(tmp_path, str(i), config=make_config(seed=seed, regularizer=reg, target__lr=lr, name=f"run{i}"))
    # One run with overrides is not enough: all runs need them, else the config decides.
    (tmp_path / "0" / ".hydra").mkdir()
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    runs, rows = analyse(tmp_path)
    ewc = "transferlab.regularizers.ewc.EWC"
    assert list(rows) == [
        f"regularizer._target_={ewc} regularizer.lam=100.0 regularizer.fisher=false "
        "regularizer.normalize=none target.lr=0.001",
        f"regularizer._target_={ewc} regularizer.lam=100.0 regularizer.fisher=false "
        "regularizer.normalize=none target.lr=0.01",
        "regularizer._target_=transferlab.regularizers.none.NoRegularizer target.lr=0.001",
    ]
    assert [row["n"] for row in rows.values()] == [2, 1, 2]
    assert "regularizer.seed" not in runs[0]["params"] and "seed" not in runs[0]["params"]
    assert runs[2]["params"]["target.lr"] == "0.01"


def test_a_sweep_over_seeds_only_is_one_setting(tmp_path):
    for seed in range(3):
        write_job(tmp_path, str(seed), config=make_config(seed=seed), overrides=[f"seed={seed}"])
    _, rows = analyse(tmp_path)
    assert list(rows) == [report.ALL_RUNS] and rows[report.ALL_RUNS]["n"] == 3


# ---------------------------------------------------------------------------------------------
# Transfer gain


def test_gain_pairs_same_seed_and_label_budget(tmp_path):
    transfer = {("t0", 0, 50): 0.90, ("t1", 1, 50): 0.80, ("t2", 2, 50): 0.70, ("t3", 0, 100): 0.95}
    scratch = {("s0", 0, 50): 0.60, ("s1", 1, 50): 0.65, ("s2", 0, 100): 0.10, ("s3", 3, 50): 0.20,
               ("s4", 0, None): 0.30}
    for (name, seed, budget), acc in transfer.items():
        # other source classes: the source is not part of the target data
        write_job(tmp_path, name, test_acc=acc,
                  config=make_config(seed=seed, budget=budget, data__source_classes=[0, 1]))
    for (name, seed, budget), acc in scratch.items():
        write_job(tmp_path, name, test_acc=acc, config=make_config(seed=seed, budget=budget, source="scratch"))
    runs, _ = analyse(tmp_path)
    assert gain_of(runs, "t0") == ("s0", pytest.approx(0.90 - 0.60))
    assert gain_of(runs, "t1") == ("s1", pytest.approx(0.80 - 0.65))
    assert gain_of(runs, "t2") == (None, None)  # no scratch run with seed 2
    assert gain_of(runs, "t3") == ("s2", pytest.approx(0.95 - 0.10))
    assert all(gain_of(runs, s[0]) == (None, None) for s in scratch)  # scratch runs have no gain


def test_gain_needs_same_target_data_and_backbone(tmp_path):
    write_job(tmp_path, "t", test_acc=0.9)
    write_job(tmp_path, "s1", test_acc=0.1, config=make_config(source="scratch", data__target_classes=[6, 7]))
    write_job(tmp_path, "s2", test_acc=0.2, config=make_config(source="scratch", backbone__channels=[8, 16]))
    write_job(tmp_path, "s3", test_acc=0.3, config=make_config(source="scratch", data__split_seed=7))
    write_job(tmp_path, "s4", test_acc=0.4, status="failed", error="x", config=make_config(source="scratch"))
    runs, _ = analyse(tmp_path)
    assert gain_of(runs, "t") == (None, None)
    write_job(tmp_path, "s5", test_acc=0.5, config=make_config(source="scratch"))
    runs, _ = analyse(tmp_path)
    assert gain_of(runs, "t") == ("s5", pytest.approx(0.4))


def test_gain_prefers_identical_recipe_then_plain_baseline_then_first(tmp_path):
    write_job(tmp_path, "t", test_acc=0.9, config=make_config(regularizer="l2sp", freeze="partial"))
    write_job(tmp_path, "10", test_acc=0.1, config=make_config(source="scratch", regularizer="ewc"))
    write_job(tmp_path, "2", test_acc=0.2, config=make_config(source="scratch", regularizer="l2sp"))
    write_job(tmp_path, "3", test_acc=0.3, config=make_config(source="scratch", regularizer="none"))
    write_job(tmp_path, "4", test_acc=0.4, config=make_config(source="scratch", regularizer="l2sp", freeze="partial"))
    write_job(tmp_path, "5", test_acc=0.5,
              config=make_config(source="scratch", regularizer="l2sp", freeze="partial", target__lr=0.1))
    runs, _ = analyse(tmp_path)
    assert gain_of(runs, "t") == ("4", pytest.approx(0.5))  # identical target/freeze/regularizer
    (tmp_path / "4" / "results.json").unlink()
    runs, _ = analyse(tmp_path)
    assert gain_of(runs, "t") == ("3", pytest.approx(0.6))  # FullFinetune + NoRegularizer
    (tmp_path / "3" / "results.json").unlink()
    runs, _ = analyse(tmp_path)
    assert gain_of(runs, "t") == ("2", pytest.approx(0.7))  # first in natural directory order (2 < 5 < 10)


def test_negative_transfer_is_flagged_only_when_the_ci_excludes_zero(tmp_path):
    bad, noisy = [0.50, 0.52, 0.49], [0.85, 0.75, 0.87]  # vs scratch 0.90, 0.80, 0.86
    for seed, scratch_acc in enumerate([0.90, 0.80, 0.86]):
        write_job(tmp_path, f"s{seed}", test_acc=scratch_acc, config=make_config(seed=seed, source="scratch"),
                  overrides=["freeze=full", "source=scratch", f"seed={seed}"])
        write_job(tmp_path, f"b{seed}", test_acc=bad[seed], config=make_config(seed=seed, freeze="partial"),
                  overrides=["freeze=partial", "source=train", f"seed={seed}"])
        write_job(tmp_path, f"n{seed}", test_acc=noisy[seed], config=make_config(seed=seed),
                  overrides=["freeze=full", "source=train", f"seed={seed}"])
    _, rows = analyse(tmp_path)
    bad_gain = rows["freeze=partial source=train"]["transfer/gain"]
    mean, _, ci = expected(np.array(bad) - [0.90, 0.80, 0.86])
    assert bad_gain["mean"] == pytest.approx(mean) and bad_gain["ci"] == pytest.approx(ci)
    assert rows["freeze=partial source=train"]["negative_transfer"]
    noisy_gain = rows["freeze=full source=train"]["transfer/gain"]
    assert noisy_gain["mean"] < 0 < noisy_gain["mean"] + noisy_gain["ci"]  # negative, but the CI spans 0
    assert not rows["freeze=full source=train"]["negative_transfer"]
    assert not rows["freeze=full source=scratch"]["negative_transfer"]

    out = report.write_report(tmp_path)
    lines = out["report.md"].read_text().splitlines()
    bad_line = results_table_row("\n".join(lines), "freeze=partial source=train")
    noisy_line = results_table_row("\n".join(lines), "freeze=full source=train")
    assert "negative transfer" in bad_line and "negative transfer" not in noisy_line
    flags = {r["setting"]: r["negative_transfer"] for r in csv.DictReader(out["report.csv"].open())}
    assert flags == {"freeze=full source=scratch": "False", "freeze=partial source=train": "True",
                     "freeze=full source=train": "False"}
    [tex_line] = [l for l in out["report.tex"].read_text().splitlines() if l.startswith("freeze=partial")]
    assert "\\dagger" in tex_line


def test_unpaired_runs_are_counted_and_named(tmp_path):
    write_job(tmp_path, "0", config=make_config(seed=0), overrides=["seed=0"])
    write_job(tmp_path, "1", config=make_config(seed=1), overrides=["seed=1"])
    write_job(tmp_path, "2", test_acc=0.5, config=make_config(seed=0, source="scratch"), overrides=["seed=0"])
    runs, rows = analyse(tmp_path)
    # all three share the overrides minus seed, so it is one setting holding one unpaired run
    row = rows[report.ALL_RUNS]
    assert row["unpaired"] == 1 and row["transfer/gain"]["n"] == 1
    text = "\n".join(report.legend(runs))
    assert "1 transfer runs paired, 1 unpaired" in text and "Unpaired (no matching scratch run, no gain): 1." in text


# ---------------------------------------------------------------------------------------------
# Failed and running jobs


def test_failed_and_running_jobs_are_counted_and_listed(tmp_path):
    for seed, acc in enumerate([0.8, 0.9]):
        write_job(tmp_path, str(seed), test_acc=acc, config=make_config(seed=seed), overrides=["lr=a", f"seed={seed}"])
    write_job(tmp_path, "2", status="failed", error="target.lr=-1.0: must be > 0", config=make_config(seed=2),
              metrics={"target/test_acc": 0.0}, overrides=["lr=a", "seed=2"])
    write_job(tmp_path, "3", status="running", config=make_config(seed=3), metrics={}, overrides=["lr=a", "seed=3"])
    write_job(tmp_path, "nested/deep/4", status="failed", error="NonFiniteLossError: loss is nan",
              config=make_config(seed=0), metrics={}, overrides=["lr=b", "seed=0"])
    write_job(tmp_path, "5", status="interrupted", error="stopped by SIGTERM in the target stage at step 7",
              config=make_config(seed=5), metrics={}, overrides=["lr=a", "seed=5"])
    _, rows = analyse(tmp_path)
    a = rows["lr=a"]
    assert (a["n"], a["completed"], a["failed"], a["running"], a["interrupted"]) == (2, 2, 1, 1, 1)
    assert a["target/test_acc"]["mean"] == pytest.approx(0.85)  # the failed run's 0.0 is not counted
    b = rows["lr=b"]
    assert (b["n"], b["completed"], b["failed"], b["running"]) == (0, 0, 1, 0)
    md = report.write_report(tmp_path)["report.md"].read_text()
    failed = md.split("## Failed jobs", 1)[1]
    assert "| 2 | lr=a | target.lr=-1.0: must be > 0 |" in failed
    assert "| nested/deep/4 | lr=b | NonFiniteLossError: loss is nan |" in failed
    assert "## Running jobs" in md.split("## Interrupted jobs")[0] and md.split("## Interrupted jobs")[0].rstrip().endswith("3")
    assert md.rstrip().endswith("5")


def test_unreadable_results_json_is_a_listed_failure(tmp_path):
    write_job(tmp_path, "0", overrides=["seed=0"])
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "results.json").write_text('{"status": "compl')
    runs = report.load_runs(tmp_path)
    assert [r["status"] for r in runs] == ["completed", "failed"]
    assert "unreadable results.json" in runs[1]["error"]
    assert "unreadable results.json" in report.write_report(tmp_path)["report.md"].read_text()


# ---------------------------------------------------------------------------------------------
# Files written and the command line


def small_sweep(root):
    """regularizer × source × 3 seeds, with overrides; known accuracies."""
    accs = {}
    job = 0
    for reg in ("none", "l2sp"):
        for src in ("train", "scratch"):
            for seed in range(3):
                acc = 0.6 + 0.1 * (src == "train") + 0.05 * (reg == "l2sp") + 0.01 * seed
                fg = None if src == "scratch" else 0.05 + 0.02 * seed - 0.03 * (reg == "l2sp")
                write_job(root, str(job), test_acc=acc, forgetting=fg,
                          config=make_config(seed=seed, source=src, regularizer=reg),
                          overrides=[f"regularizer={reg}", f"source={src}", f"seed={seed}", "debug=fast"])
                accs.setdefault(f"regularizer={reg} source={src}", []).append(acc)
                job += 1
    return accs


def test_report_files_are_written_and_csv_round_trips(tmp_path):
    sweep, out = tmp_path / "sweep", tmp_path / "out"
    accs = small_sweep(sweep)
    written = report.write_report(sweep, out)
    for name in ("report.md", "report.csv", "report.tex"):
        assert written[name] == out / name and written[name].is_file()
    assert not (sweep / "report.md").exists()

    csv_rows = {r["setting"]: r for r in csv.DictReader(written["report.csv"].open())}
    _, rows = analyse(sweep)
    assert list(csv_rows) == list(rows) == list(accs)
    for label, row in rows.items():
        parsed = csv_rows[label]
        assert int(parsed["completed"]) == 3 and int(parsed["failed"]) == 0
        assert parsed["regularizer"] == row["params"]["regularizer"]
        mean, std, ci = expected(accs[label])
        assert float(parsed["target/test_acc_mean"]) == pytest.approx(mean, rel=1e-12)
        assert float(parsed["target/test_acc_std"]) == pytest.approx(std, rel=1e-12)
        assert float(parsed["target/test_acc_ci"]) == pytest.approx(ci, rel=1e-12)
        for metric in report.METRICS:
            for stat in ("mean", "std", "ci"):
                value = row[metric][stat]
                cell = parsed[f"{metric}_{stat}"]
                assert (cell == "" and math.isnan(value)) or float(cell) == value  # exact round trip
    # seed-paired gain: train − scratch of the same regularizer is 0.1 for every seed
    gain = rows["regularizer=l2sp source=train"]["transfer/gain"]
    assert gain["n"] == 3 and gain["mean"] == pytest.approx(0.1) and gain["std"] == pytest.approx(0, abs=1e-12)

    tex = written["report.tex"].read_text()
    assert tex.index("\\toprule") < tex.index("\\midrule") < tex.index("\\bottomrule") < tex.index("\\end{tabular}")
    mean, _, ci = expected(accs["regularizer=none source=train"])
    assert f"regularizer=none source=train & 3 & ${mean:.4f} \\pm {ci:.4f}$" in tex

    md = written["report.md"].read_text()
    assert f"| regularizer=none source=train | 3 | {mean:.4f} ± {ci:.4f} |" in md

    plots = {name for name in written if name.startswith("plots/") and "_vs_" in name and "stability" not in name}
    stems = {f"plots/{m.replace('/', '_')}_vs_{key}" for m in report.METRICS for key in ("regularizer", "source")}
    stems.add("plots/tradeoff_forgetting_vs_target_test_acc")
    assert {name for name in plots if name.rsplit(".", 1)[0] in stems} == {f"{s}.{ext}" for s in stems
                                                                           for ext in ("png", "pdf")}
    for name in plots:
        if name.endswith(".png"):
            assert written[name].read_bytes()[:8] == PNG_MAGIC and written[name].stat().st_size > 1000
        else:
            assert written[name].read_bytes()[:5] == b"%PDF-"


def test_numeric_key_plot_and_tex_escaping(tmp_path):
    for i, lam in enumerate([1, 10, 1000]):
        for seed in range(2):
            write_job(tmp_path, f"{i}_{seed}", test_acc=0.5 + 0.1 * i + 0.01 * seed,
                      config=make_config(seed=seed, regularizer="ewc"),
                      overrides=[f"regularizer.lam={lam}", f"seed={seed}", "name=a_b&c"])
    written = report.write_report(tmp_path)
    assert written["plots/target_test_acc_vs_regularizer_lam.png"].read_bytes()[:8] == PNG_MAGIC
    tex = written["report.tex"].read_text()
    assert "regularizer.lam=1000 & 2 &" in tex
    unescaped = report.tex_escape("a_b&c 50% $x$ #1 {y}")
    assert unescaped == "a\\_b\\&c 50\\% \\$x\\$ \\#1 \\{y\\}"


def test_main_prints_the_table_and_writes_the_report(tmp_path, capsys):
    small_sweep(tmp_path / "sweep")
    assert report.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "out" / "report.md").read_text()
    assert "| setting | n | target/test_acc |" in printed and "| regularizer=l2sp source=scratch | 3 |" in printed


def test_main_on_an_empty_or_missing_dir_returns_2_with_one_line(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no results.json under" in err
    assert not (tmp_path / "report.md").exists()
    assert report.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such directory" in err


def test_load_runs_reads_overrides_and_natural_order(tmp_path):
    for name in ("10", "2", "a/1"):
        write_job(tmp_path, name, config=make_config(), overrides=["regularizer=l2sp", "seed=0"])
    write_job(tmp_path, "b", config=make_config())
    runs = report.load_runs(tmp_path)
    assert [r["name"] for r in runs] == ["2", "10", "a/1", "b"]
    assert runs[0]["overrides"] == ["regularizer=l2sp", "seed=0"] and runs[3]["overrides"] is None
    assert runs[0]["dir"] == tmp_path / "2" and runs[0]["metrics"]["target/test_acc"] == 0.9


def test_settings_and_categorical_figures_order_numbers_by_value(tmp_path, monkeypatch):
    """α = 0.001, 0.01, 0.1, 1 in that order in the table and on a categorical axis (α is
    categorical when an arm without it shares the sweep), however the job folders sort as text;
    a preset's group path goes from the legend, as from the setting names."""
    from transferlab import figures

    for alpha in ("0.1", "1", "0.01", "0.001"):
        for seed in range(2):
            write_job(tmp_path, f"+ablation/regularizer=l2sp,regularizer.alpha={alpha},seed={seed}",
                      config=make_config(seed=seed, regularizer="l2sp"),
                      overrides=["+ablation/regularizer=l2sp", f"regularizer.alpha={alpha}", f"seed={seed}"])
    for seed in range(2):
        write_job(tmp_path, f"+ablation/regularizer=none,seed={seed}", config=make_config(seed=seed),
                  overrides=["+ablation/regularizer=none", f"seed={seed}"])
    runs, rows = analyse(tmp_path)
    assert list(rows) == [f"regularizer=l2sp regularizer.alpha={a}" for a in ("0.001", "0.01", "0.1", "1")] + [
        "regularizer=none"]
    drawn = []
    real = figures.categorical
    monkeypatch.setattr(figures, "categorical", lambda points, *a, **k: drawn.append(list(points)) or real(points, *a, **k))
    report.write_report(tmp_path)
    by_alpha = next(points for points in drawn if {p["label"] for p in points} >= {"0.001", "1"})
    assert list(dict.fromkeys(p["label"] for p in by_alpha)) == ["0.001", "0.01", "0.1", "1", "—"]
    assert {p["group"] for p in by_alpha} == {"regularizer=l2sp", "regularizer=none"}


def test_overrides_yaml_is_read_as_hydra_writes_it(tmp_path):
    """Hydra writes .hydra/overrides.yaml as a YAML list of strings, quoting where YAML needs it:
    each override comes back as written (quotes, commas, brackets, braces, '=' in the value, '+' / '~')."""
    written = ["seed=0", "+regularizer@extra_regularizers.bss2=bss", "~trainer.gradient_clip_val",
               "+note='x, y' #c", 'label="[z]: w"', "data.ood_domains=[1,2]", "+meta={a: 1, b: [2]}",
               "target.lr=1e-3", "expr=a=b", "key=", "flag=true", "name=null", "- odd=1"]
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump(written))
    assert report.read_overrides(str(path)) == written
    path.write_text("- seed=0\n- regularizer=l2sp\n")  # Hydra's plain form
    assert report.read_overrides(str(path)) == ["seed=0", "regularizer=l2sp"]
    path.write_text("")
    assert report.read_overrides(str(path)) == []
    path.write_text("seed: 0\n")  # not a list
    assert report.read_overrides(str(path)) is None
    path.write_text("- [unclosed\n")  # not YAML
    assert report.read_overrides(str(path)) is None
    assert report.read_overrides(str(tmp_path / "missing.yaml")) is None


def test_wise_ft_table_means_the_curve_and_counts_the_chosen_alphas(tmp_path):
    from transferlab.evidence import by_setting, wise_ft_table

    curves = {0: ([0.5, 0.7, 0.9], 0.5), 1: ([0.6, 0.8, 0.7], 0.5), 2: ([0.4, 0.6, 0.95], 1)}
    for seed, (accs, best) in curves.items():
        m = {f"wise_ft/{a:g}/target/test_acc": acc for a, acc in zip((0, 0.5, 1), accs)}
        m |= {"target/test_acc": accs[2], "target/val_acc": accs[2], "wise_ft/best_alpha": best,
              "wise_ft/target/test_acc": accs[[0, 0.5, 1].index(best)], "wise_ft/transfer/forgetting": 0.1 * seed}
        write_job(tmp_path, str(seed), config=make_config(seed=seed), metrics=m)
    runs, _ = analyse(tmp_path)
    table = "\n".join(wise_ft_table(by_setting(runs), [0.0, 0.5, 1.0], "target/test_acc"))
    [setting] = by_setting(runs)
    cells = md_cells(table, setting)
    for alpha, column in ((0, 0), (0.5, 1), (1, 2)):
        mean, _, ci = expected([accs[column] for accs, _ in curves.values()])
        assert cells[f"α = {alpha:g}"] == f"{mean:.4f} ± {ci:.4f}"
    assert cells["chosen α (seeds)"] == "1 ×1, 0.5 ×2"
    mean, _, ci = expected([0.7, 0.8, 0.95])
    assert cells["target/test_acc at chosen α"] == f"{mean:.4f} ± {ci:.4f}"
    mean, _, ci = expected([0.0, 0.1, 0.2])
    assert cells["forgetting at chosen α"] == f"{mean:.4f} ± {ci:.4f}"
