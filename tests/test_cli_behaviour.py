"""What a user sees and keeps: progress while training (a bar on a terminal, a line per epoch
elsewhere), Ctrl-C during start-up, broken environments (an unwritable output or cache folder, a
missing dataset, W&B without a network, a report over nothing readable) stopped in one line, the
stage cache independent of the working directory, the CSV log's epoch column."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import compose_config

from transferlab.experiment import run_experiment

FAST = ["debug=fast", "backbone.channels=[8,16]"]
LINE = re.compile(r"^\[(source|target)\] epoch (\d+)/(\d+)  loss (\d+\.\d{3})  val_acc (\d\.\d{4})  \d+\.\d s$")


def transferlab(*args, cwd: Path, env_extra=None, prefix=(), **kwargs):
    env = {**os.environ, "TRANSFERLAB_OUTPUT": str(cwd / "out"), "TRANSFERLAB_CACHE": str(cwd / "cache"),
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([*prefix, sys.executable, "-m", "transferlab", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def csv_rows(run_dir: Path, stage: str) -> list[dict]:
    with open(run_dir / "csv" / stage / "metrics.csv") as f:
        return list(csv.DictReader(f))


# -- progress and the CSV log ---------------------------------------------------------------------
def test_epoch_lines_off_a_terminal_and_the_csv_epoch_on_step_rows(make_cfg, tmp_path, capsys):
    cfg = make_cfg("target.epochs=1")  # 2 source epochs; stdout is pytest's capture: not a terminal
    results = run_experiment(cfg, tmp_path / "run")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m[1], m[2], m[3]) for m in parsed] == [("source", "1", "2"), ("source", "2", "2"), ("target", "1", "1")]
    # The line's metric is the epoch's validation score, as the CSV log recorded it.
    for m in parsed:
        epoch_rows = [r for r in csv_rows(tmp_path / "run", m[1]) if r[f"{m[1]}/val_acc"]]
        assert float(m[5]) == pytest.approx(float(epoch_rows[int(m[2]) - 1][f"{m[1]}/val_acc"]), abs=6e-5)
    assert float(parsed[-1][5]) == pytest.approx(results["metrics"]["target/val_acc"], abs=6e-5)
    # The loss is the epoch's mean training loss: between the smallest and largest logged step losses.
    steps = [r for r in csv_rows(tmp_path / "run", "source") if r["source/train_loss"]]
    first_epoch = [float(r["source/train_loss"]) for r in steps if r["epoch"] == "0"]
    assert min(first_epoch) <= float(parsed[0][4]) <= max(first_epoch) + 1e-3
    # Training-step rows carry their epoch (they were empty): epochs 0 and 1 both appear.
    assert {r["epoch"] for r in steps} == {"0", "1"}


def test_progress_bar_shows_loss_and_the_validation_metric(make_cfg, tmp_path, capsys):
    run_experiment(make_cfg("source=scratch", "target.epochs=1", "trainer.progress_bar=true"), tmp_path / "run")
    out = capsys.readouterr().out  # Lightning's tqdm bar writes to stdout
    assert "[target] epoch 1/1: 100%" in out and re.search(r"loss=\d\.\d{3}, val_acc=\d\.\d{4}\]", out), out[-500:]
    assert "v_num" not in out
    assert not re.search(r"\[target\] epoch 1/1  loss", out)  # the bar replaces the lines


def test_auto_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch):
    from transferlab.stages.progress import progress_mode

    leader, follower = os.openpty()
    with open(follower, "w") as terminal:
        monkeypatch.setattr(sys, "stdout", terminal)
        assert progress_mode("auto") == "bar"
        assert progress_mode(False) == "off" and progress_mode(True) == "bar"
    os.close(leader)
    monkeypatch.undo()
    assert progress_mode("auto") == "lines"


# -- start-up and broken environments -------------------------------------------------------------
def catches_sigint(pid: int, timeout_s: float = 60.0) -> None:
    """Wait until process pid has a SIGINT handler of its own (Linux: SigCgt in /proc/pid/status),
    which Python installs early in its start-up; on a loaded machine that can take over a second."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return  # not Linux, or gone: send it anyway
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught & (1 << (signal.SIGINT - 1)):
            return
        time.sleep(0.05)


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    env = {**os.environ, "TRANSFERLAB_OUTPUT": str(tmp_path / "out"), "TRANSFERLAB_CACHE": str(tmp_path / "cache")}
    # SIGINT back to its default in the child: a test run started in the background inherits it
    # ignored, and Python then never raises KeyboardInterrupt
    process = subprocess.Popen([sys.executable, "-m", "transferlab", *FAST], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    catches_sigint(process.pid)  # the interpreter is up (before it, SIGINT would just kill it: exit -2)
    time.sleep(0.5)  # importing torch and Lightning, or composing the config
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err


def test_a_second_ctrl_c_while_training_exits_at_once(tmp_path):
    # The first Ctrl-C asks the stage to stop at its next batch end; the second does not wait for it.
    code = ("import os, signal, time\n"
            "from transferlab.stages.checkpointing import fitting, stop_on_sigterm\n"
            "with stop_on_sigterm(), fitting():\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    print('first Ctrl-C: still training', flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(30)\n"
            "print('not reached')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 130
    assert result.stdout == "first Ctrl-C: still training\n"
    assert "interrupted again: exiting now" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("override, key", [("hydra.run.dir={bad}/run", "hydra.run.dir"), ("cache.dir={bad}", "cache.dir")])
def test_unwritable_output_or_cache_folder_is_one_line(tmp_path, override, key):
    bad = tmp_path / "a_file"
    bad.write_text("not a folder")
    result = transferlab(*FAST, override.format(bad=bad), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"transferlab: error: cannot write to {key}={bad}")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unwritable_output_root_from_the_environment(tmp_path):
    result = transferlab("-m", *FAST, "seed=0,1", cwd=tmp_path, env_extra={"TRANSFERLAB_OUTPUT": "/proc/x"})
    assert result.returncode == 1
    assert result.stderr.startswith("transferlab: error: cannot write to hydra.sweep.dir=/proc/x/multiruns/")
    assert "TRANSFERLAB_OUTPUT" in result.stderr and "Traceback" not in result.stderr


def test_missing_dataset_is_printed_once(tmp_path):
    result = transferlab(*FAST, "data=fashion_mnist", f"paths.fashion_mnist={tmp_path / 'nothing'}", cwd=tmp_path)
    assert result.returncode == 1
    assert (result.stdout + result.stderr).count("Fashion-MNIST not found") == 1, result.stdout + result.stderr


def test_report_over_nothing_readable_exits_2(tmp_path, capsys):
    from transferlab.report import main as report_main

    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "results.json").write_text("{truncated")
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("transferlab report: error: none of the 1 results.json") and str(tmp_path) in err
    assert not (tmp_path / "report.md").exists()


def test_stage_cache_is_the_same_from_any_working_directory(tmp_path):
    cache = tmp_path / "user-cache"
    for cwd in ("a", "b"):
        (tmp_path / cwd).mkdir()
    saved = os.environ["TRANSFERLAB_CACHE"]
    os.environ["TRANSFERLAB_CACHE"] = str(cache)
    try:
        assert compose_config().cache.dir == str(cache)
    finally:
        os.environ["TRANSFERLAB_CACHE"] = saved
    env = {k: v for k, v in os.environ.items() if k != "TRANSFERLAB_CACHE"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    shown = [subprocess.run([sys.executable, "-m", "transferlab", "--cfg", "job", "--resolve"], cwd=tmp_path / cwd,
                            env=env, capture_output=True, text=True, timeout=120).stdout for cwd in ("a", "b")]
    assert shown[0] == shown[1] and f"dir: {tmp_path / 'xdg' / 'transferlab'}\n" in shown[0]


def unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
@pytest.mark.skipif(not unshare_works(), reason="needs `unshare -n` (a network namespace; root)")
def test_wandb_online_without_a_network_falls_back_fast(tmp_path):
    # A key, so W&B really tries its server (without one it stops at once on the missing login).
    started = time.monotonic()
    result = transferlab("logger=wandb", "source=scratch", "target.epochs=1", "backbone.channels=[8,16]", cwd=tmp_path,
                         prefix=("unshare", "-n"), env_extra={"WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40})
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert elapsed < 60, f"{elapsed:.0f} s: W&B waited on its init timeout (~90 s a stage)"
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "W&B" in line and "WARNING" in line]
    assert len(warnings) == 1 and "cannot reach" in warnings[0] and "logging offline" in warnings[0], warnings
    [path] = (tmp_path / "out").rglob("results.json")
    assert json.loads(path.read_text())["status"] == "completed"
    assert list((path.parent / "wandb").glob("offline-run-*"))
