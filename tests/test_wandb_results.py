"""W&B carries the results: a completed run's results.json metrics in its target W&B run's summary,
and a sweep's report (table + figures) in one W&B run of the sweep's group — read back from the
offline run files W&B writes (its LevelDB-style record log of protobuf `Record`s, and the media
files beside it), never from a mock."""

from __future__ import annotations

import csv
import inspect
import json
import struct
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose_config
from transferlab import experiment, report, sweep
from transferlab.stages import trainer

BLOCK = 32768  # the record log's block size (LevelDB's log format, which W&B's .wandb files use)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """Every protobuf Record of one offline `run-<id>.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
    pos, parts = 7, []  # ":W&B", a 2-byte magic number and a version byte
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = [chunk] if kind in (FULL, FIRST) else [*parts, chunk]
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def offline_runs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "wandb").glob("offline-run-*") if p.is_dir())


def run_file(folder: Path, wait_s: float = 30.0) -> Path:
    """The folder's record log, once it holds the run's exit record: W&B's service process may
    still be writing the tail of the log when `run.finish()` returns."""
    [path] = folder.glob("run-*.wandb")
    deadline = time.monotonic() + wait_s
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
        assert time.monotonic() < deadline, f"{path}: no exit record after {wait_s:.0f} s"
        time.sleep(0.2)
    return path


def summary_of(folder: Path) -> dict:
    """The run's summary as W&B would upload it: every summary update, later ones winning."""
    summary = {}
    for record in wandb_records(run_file(folder)):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


def run_record(folder: Path):
    [record] = [r.run for r in wandb_records(run_file(folder)) if r.WhichOneof("record_type") == "run"]
    return record


def wandb_cfg(tmp_path, *overrides):
    return compose_config(["logger=wandb", f"paths.output_root={tmp_path / 'outputs'}", *overrides])


RESULTS = {
    "status": "completed", "error": None,
    "metrics": {"target/test_acc": 0.8125, "target/val_acc": 0.79, "target/test_macro_f1": 0.8001,
                "source/test_acc_before": 0.97, "source/test_acc_after": 0.9137, "transfer/forgetting": 0.0563,
                "params/trainable": 12345, "cache/source_hit": True, "wise_ft/best_alpha": 0.5,
                "transferability/logme": -0.4321, "unrecorded": None},
    "task": {"kind": "classification", "primary_metric": "acc", "majority_test": 0.21},
    "provenance": {"wall_time_s": 12.5},
}


def test_every_metric_lands_in_the_target_runs_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = wandb_cfg(tmp_path, "seed=3")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "wandb-target.id").write_text("tgt0123abcd")  # the target stage's W&B run
    folder = trainer.log_results_to_wandb(cfg, run_dir, RESULTS)
    assert folder is not None and offline_runs(run_dir) == [folder]
    summary = summary_of(folder)
    for key, value in RESULTS["metrics"].items():
        if value is not None:
            assert summary[key] == value, key
    assert "unrecorded" not in summary  # a null metric is left out, not shown as text
    assert summary["status"] == "completed" and summary["task/primary_metric"] == "acc"
    assert summary["task/majority_test"] == 0.21 and summary["time/wall_s"] == 12.5
    run = run_record(folder)
    # the same W&B run as the target stage's: its id, job type and name
    assert run.run_id == "tgt0123abcd" and run.job_type == "target" and run.display_name == "default-target-seed3"


def test_no_summary_run_without_wandb_or_for_an_unfinished_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert trainer.log_results_to_wandb(compose_config(["logger=csv"]), tmp_path / "a", RESULTS) is None
    assert trainer.log_results_to_wandb(wandb_cfg(tmp_path), tmp_path / "b", RESULTS | {"status": "failed"}) is None
    assert not (tmp_path / "a" / "wandb").exists() and not (tmp_path / "b" / "wandb").exists()


HOOKED = "log_results_to_wandb" in inspect.getsource(experiment.run_experiment)


@pytest.mark.skipif(not HOOKED, reason="experiment.run_experiment does not call stages.trainer.log_results_to_wandb yet")
def test_a_default_runs_offline_wandb_summary_holds_its_results(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    results = experiment.run_experiment(make_cfg("logger=wandb", "source.epochs=1", "target.epochs=1"), run_dir)
    target_id = (run_dir / "checkpoints" / "wandb-target.id").read_text().strip()
    with_summary = [f for f in offline_runs(run_dir) if "target/test_acc" in summary_of(f)]
    [folder] = with_summary
    assert run_record(folder).run_id == target_id  # the target stage's run, not a new one
    summary = summary_of(folder)
    on_disk = json.loads((run_dir / "results.json").read_text())["metrics"]
    assert summary["target/test_acc"] == on_disk["target/test_acc"] == results["metrics"]["target/test_acc"]
    assert summary["transfer/forgetting"] == on_disk["transfer/forgetting"]
    assert summary["transfer/forgetting"] == pytest.approx(
        on_disk["source/test_acc_before"] - on_disk["source/test_acc_after"])


def write_sweep(root: Path) -> None:
    for j, (reg, seed, acc) in enumerate([("none", 0, 0.70), ("none", 1, 0.72), ("l2sp", 0, 0.75), ("l2sp", 1, 0.79)]):
        job = root / str(j)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- regularizer={reg}\n- seed={seed}\n")
        metrics = {"target/test_acc": acc, "target/val_acc": acc - 0.01, "source/test_acc_before": 0.9,
                   "source/test_acc_after": 0.85, "transfer/forgetting": 0.05}
        (job / "results.json").write_text(json.dumps({
            "status": "completed", "error": None, "metrics": metrics, "task": {"primary_metric": "acc"},
            "config": {"seed": seed, "source": {"mode": "train"}, "regularizer": {"name": reg}}}))


def test_the_sweep_report_goes_to_one_wandb_run_of_the_sweeps_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep_dir = tmp_path / "multiruns" / "study" / "2026-01-01_00-00-00"
    write_sweep(sweep_dir)
    written = report.write_report(sweep_dir)
    config = OmegaConf.create({"logger": {"backend": "wandb", "project": "transferlab", "entity": None,
                                          "mode": "offline", "group": None, "tags": []}})
    folder = sweep.log_report_to_wandb(sweep_dir, config, written)
    assert folder is not None and offline_runs(sweep_dir) == [folder]
    run = run_record(folder)
    assert run.run_group == "study-2026-01-01_00-00-00" and run.job_type == "report"  # the jobs' group
    # the table: report.csv's header and rows, numbers as numbers
    [table_file] = (folder / "files" / "media" / "table").rglob("*.table.json")
    table = json.loads(table_file.read_text())
    with written["report.csv"].open(newline="") as f:
        header, *rows = list(csv.reader(f))
    assert table["columns"] == header and len(table["data"]) == len(rows) == 2
    by_setting = {r[0]: dict(zip(header, r)) for r in table["data"]}
    assert by_setting["regularizer=l2sp"]["target/test_acc_mean"] == pytest.approx((0.75 + 0.79) / 2)
    assert by_setting["regularizer=none"]["completed"] == 2
    # every PNG figure of the report, as an image
    pngs = sorted(Path(name).stem for name in written if name.endswith(".png"))
    assert pngs
    logged = sorted(p.name.rsplit("_", 2)[0] for p in (folder / "files" / "media" / "images").rglob("*.png"))
    assert logged == pngs
    history = [r.history for r in wandb_records(run_file(folder)) if r.WhichOneof("record_type") == "history"]
    keys = {item.key or item.nested_key[0] for h in history for item in h.item}  # a medium: its nested fields
    assert "report/table" in keys and {f"figures/{stem}" for stem in pngs} <= keys
    # a relaunched sweep's report updates the same W&B run
    again = sweep.log_report_to_wandb(sweep_dir, config, written)
    assert run_record(again).run_id == run.run_id
