"""The installed console script, as a user runs it: from any directory, single runs and
multiruns, errors as one line with a non-zero exit, W&B offline runs with the right exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FAST = ["debug=fast", "backbone.channels=[8,16]", "source.lr=1e-2", "target.lr=1e-2"]
WANDB_FAST = ["logger=wandb", "source.epochs=1", "target.epochs=1", "backbone.channels=[8,16]"]  # debug=fast means csv


def transferlab(*args, cwd: Path, env_extra=None):
    env = {**os.environ, "TRANSFERLAB_OUTPUT": str(cwd / "out"), "TRANSFERLAB_CACHE": str(cwd / "out" / "cache"),
           "WANDB_MODE": "offline", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "transferlab", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def results_under(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) | {"_dir": str(p.parent)} for p in sorted(root.rglob("results.json"))]


def test_help_and_cfg_work_from_any_directory(tmp_path):
    helped = transferlab("--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("transferlab — transfer-learning experiments")
    assert "transferlab report <sweep dir>" in helped.stdout and "schema" not in helped.stdout
    for group, option in [("freeze", "lp_ft"), ("regularizer", "l2sp"), ("optimizer", "sgd"), ("scheduler", "cosine")]:
        assert f"  {group}:" in helped.stdout and f" {option} " in helped.stdout
    assert "*full " in helped.stdout and "*none " in helped.stdout  # the defaults, marked
    shown = transferlab("--cfg", "job", "regularizer=l2sp", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "_target_: transferlab.regularizers.l2sp.L2SP" in shown.stdout


def test_misspelled_key_exits_nonzero_naming_it(tmp_path):
    result = transferlab("freeze=partial", "freeze.kk=1", cwd=tmp_path)
    assert result.returncode != 0
    assert "freeze.kk" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_value_is_one_line_nonzero_exit_and_a_failed_results_json(tmp_path):
    result = transferlab("target.lr=-1", *FAST[:2], cwd=tmp_path)
    assert result.returncode == 1
    assert "transferlab: error: target.lr=-1.0: must be > 0\n" in result.stderr
    assert (result.stdout + result.stderr).count("must be > 0") == 1  # printed once, not logged as well
    assert "Traceback" not in result.stderr
    [results] = results_under(tmp_path / "out")
    assert results["status"] == "failed" and results["error"] == "target.lr=-1.0: must be > 0"


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_single_run_prints_summary_and_writes_a_finished_offline_wandb_run(tmp_path):
    result = transferlab(*WANDB_FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "target/test_acc" in result.stdout and "transfer/forgetting" in result.stdout
    [results] = results_under(tmp_path / "out")
    run_dir = Path(results["_dir"])
    assert results["status"] == "completed"
    # Not a terminal: one progress line per epoch and stage, the metric the one selection used.
    [source_line] = [line for line in result.stdout.splitlines() if line.startswith("[source] epoch 1/1  loss ")]
    [target_line] = [line for line in result.stdout.splitlines() if line.startswith("[target] epoch 1/1  loss ")]
    assert f"  val_acc {results['metrics']['target/val_acc']:.4f}  " in target_line and target_line.endswith(" s")
    assert f"  stage cache: {tmp_path / 'out' / 'cache'}\n" in result.stdout
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    # one W&B run per stage; the results summary reopens the target's run (offline: a second folder, same id)
    assert len({run.name.split("-")[-1] if not run.name.endswith("-1") else run.name.split("-")[-2] for run in runs}) == 2
    for run in runs:
        assert "got exitcode: 0" in (run / "logs" / "debug.log").read_text()
    payload = b"".join(p.read_bytes() for run in runs for p in run.glob("run-*.wandb"))
    for needle in (b"target/val_acc", b"source/val_acc", b"default-source-seed0", b"default-target-seed0"):
        assert needle in payload


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_failed_run_closes_its_wandb_run_with_nonzero_exit(tmp_path):
    result = transferlab(*WANDB_FAST, "target.lr=1e30", cwd=tmp_path)
    assert result.returncode == 1
    assert "training loss became" in result.stderr
    [results] = results_under(tmp_path / "out")
    assert results["status"] == "failed"
    logs = sorted(Path(results["_dir"]).glob("wandb/offline-run-*/logs/debug.log"))
    assert len(logs) == 2
    exit_codes = sorted(log.read_text().split("got exitcode: ")[1][0] for log in logs)
    assert exit_codes == ["0", "1"]  # source finished, target failed


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_sweep_runs_every_job_in_its_own_directory(tmp_path):
    result = transferlab("-m", "regularizer=none,l2sp,ewc", "seed=0,1,2", *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = results_under(tmp_path / "out" / "multiruns")
    assert len(runs) == 9 and len({r["_dir"] for r in runs}) == 9
    assert all(r["status"] == "completed" for r in runs)
    settings = {(r["config"]["regularizer"]["_target_"].rsplit(".", 1)[-1], r["config"]["seed"]) for r in runs}
    assert settings == {(reg, seed) for reg in ("NoRegularizer", "L2SP", "EWC") for seed in (0, 1, 2)}


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    result = transferlab("-m", "target.lr=-1,1e-2", *FAST[:2], cwd=tmp_path)
    assert result.returncode == 1
    assert "2 jobs, 1 completed" in result.stdout and "FAILED 0: target.lr=-1.0: must be > 0" in result.stdout
    runs = {r["config"]["target"]["lr"]: r for r in results_under(tmp_path / "out" / "multiruns")}
    assert runs[-1.0]["status"] == "failed" and "target.lr" in runs[-1.0]["error"]
    assert runs[0.01]["status"] == "completed"
    # One line per finished job, before the sweep summary: overrides, status, primary metric, time.
    lines = result.stdout.splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("sweep "))
    jobs = [line for line in lines[:summary] if line.startswith("job ")]
    assert jobs[0].startswith("job 0 [target.lr=-1 debug=fast backbone.channels=[8,16]]: failed: target.lr=-1.0")
    acc = runs[0.01]["metrics"]["target/test_acc"]
    assert jobs[1].startswith(f"job 1 [target.lr=0.01 debug=fast backbone.channels=[8,16]]: completed  test_acc {acc:.4f}  ")
    assert len(jobs) == 2 and jobs[1].endswith(" s")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist")
def test_console_script_is_installed(tmp_path):
    exe = Path(sys.executable).with_name("transferlab")
    assert exe.is_file()
    result = subprocess.run([str(exe), "--cfg", "job", "data=fashion_mnist"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "load_fashion_mnist" in result.stdout
