"""`transferlab status`: counts, errors, running stages and ages, the job total from
multirun.yaml, the ETA formula, --watch and its Ctrl-C, the exit code on nothing readable, that
it imports neither torch nor Lightning, and a real multirun watched while it runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transferlab import status

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def write_multirun(sweep: Path, task: list[str], sweeper: dict | None = None) -> None:
    """multirun.yaml as Hydra writes it, reduced to what status reads."""
    sweep.mkdir(parents=True, exist_ok=True)
    hydra = {"sweeper": sweeper or {"_target_": BASIC_SWEEPER, "max_batch_size": None, "params": None},
             "overrides": {"task": task}}
    (sweep / "multirun.yaml").write_text(json.dumps({"hydra": hydra, "seed": 0}))  # JSON is YAML


def write_job(sweep: Path, name: str, status_: str | None, *, wall=None, error=None, age_s=0.0,
              checkpoints=(), mode="train", text=None) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    if checkpoints:
        (job / "checkpoints").mkdir()
        for ckpt in checkpoints:
            (job / "checkpoints" / ckpt).write_bytes(b"x")
            os.utime(job / "checkpoints" / ckpt, (time.time() - age_s, time.time() - age_s))
    if status_ is not None or text is not None:
        results = {"status": status_, "error": error, "metrics": {}, "config": {"source": {"mode": mode}},
                   "provenance": {"seed": 0, "wall_time_s": wall}}
        path = job / "results.json"
        path.write_text(text if text is not None else json.dumps(results, indent=2))
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return job


@pytest.fixture
def sweep(tmp_path):
    """12 jobs planned (3 regularizers × seeds 0-3); 9 have a directory."""
    root = tmp_path / "sweep"
    write_multirun(root, ["regularizer=none,l2sp,ewc", "seed=range(0,4)", "logger=csv"])
    write_job(root, "0", "completed", wall=10.0)
    write_job(root, "1", "completed", wall=20.0)
    write_job(root, "2", "completed", wall=30.0)
    write_job(root, "3", "failed", error="NonFiniteLossError: the target loss became nan\n  at step 3")
    write_job(root, "4", "interrupted", error="stopped by SIGTERM in the target stage at step 7")
    write_job(root, "5", "running", age_s=50.0, checkpoints=["source.pt"])  # target stage
    write_job(root, "6", "running", age_s=5.0, checkpoints=["source.ckpt"])  # source stage
    write_job(root, "10", None)  # .hydra/ only: Hydra made the dir, results.json not written yet
    write_job(root, "7", None, text='{"status": "compl')  # torn
    return root


def test_counts_stages_ages_and_eta(sweep):
    s = status.sweep_status(sweep)
    assert s["total"] == 12
    assert s["counts"] == {"completed": 3, "running": 3, "failed": 1, "interrupted": 1, "unreadable": 1,
                           "not started": 3}
    jobs = {job.name: job for job in s["jobs"]}
    assert [job.name for job in s["jobs"]] == ["0", "1", "2", "3", "4", "5", "6", "7", "10"]  # natural order
    assert (jobs["5"].stage, jobs["6"].stage, jobs["10"].stage) == ("target", "source", "starting")
    assert jobs["5"].age_s == pytest.approx(50, abs=2) and jobs["6"].age_s == pytest.approx(5, abs=2)
    assert jobs["5"].last_write_s == pytest.approx(50, abs=2)
    assert s["mean_wall_s"] == pytest.approx(20.0)
    # (Σ over running jobs of max(w − age, 0) + not started × w) / running jobs, w = 20
    ages = [jobs[n].age_s for n in ("5", "6", "10")]
    assert s["eta_s"] == pytest.approx((sum(max(20 - a, 0) for a in ages) + 3 * 20) / 3)

    text = status.format_status(s)
    lines = text.splitlines()
    assert lines[0].startswith(f"sweep {sweep}: 12 jobs (multirun.yaml)")
    assert lines[1] == "  completed 3 · running 3 · failed 1 · interrupted 1 · unreadable 1 · not started 3"
    assert "  3     NonFiniteLossError: the target loss became nan at step 3" in lines  # one line
    assert "  4     stopped by SIGTERM in the target stage at step 7" in lines
    assert any(line.startswith("  7 ") and "does not parse" in line for line in lines)
    [five] = [line for line in lines if line.startswith("  5 ")]
    assert "target" in five and "age     50s" in five
    assert lines[-1].startswith("ETA ≈ ") and "mean wall time 20.0 s over 3 completed; 3 not started, 3 running" in lines[-1]


def test_eta_weights_each_job_by_what_its_arm_costs(tmp_path):
    """A scratch job has no source stage: it costs less, and the ETA counts each job not started or
    running at its own arm's mean wall time (arm = overrides but the seed), not the sweep's mean."""
    root = tmp_path / "sweep"
    write_multirun(root, ["source=train,scratch", "seed=range(0,3)"])
    for name, overrides, state, wall, age_s in [
            ("0", ["source=train", "seed=0"], "completed", 40.0, 0.0),
            ("1", ["source=scratch", "seed=0"], "completed", 4.0, 0.0),
            ("2", ["source=scratch", "seed=1"], "completed", 4.0, 0.0),
            ("3", ["source=train", "seed=1"], "running", None, 10.0)]:
        job = write_job(root, name, state, wall=wall, age_s=age_s)
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    s = status.sweep_status(root)
    assert s["counts"]["not started"] == 2 and s["mean_wall_s"] == pytest.approx(16.0)
    # running: train seed 1, 40 − 10 s left; not started: train seed 2 (40 s) and scratch seed 2 (4 s)
    assert s["eta_s"] == pytest.approx((40 - 10) + 40 + 4, abs=1)  # the sweep's mean would say (16 − 10) + 2 × 16
    assert "each job weighted by its arm's mean" in status.format_status(s)
    # a job whose overrides cannot be read: every job not started counts the sweep's mean, as before
    (root / "2" / ".hydra" / "overrides.yaml").unlink()
    s = status.sweep_status(root)
    assert s["eta_s"] == pytest.approx((40 - 10) + 2 * 16, abs=1)
    assert "weighted by its arm" not in status.format_status(s)


def test_overrides_are_read_plain_or_through_yaml(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- seed=1\n- 'regularizer.blocks=[0,1]'\n- freeze=full\n")
    assert status.read_overrides(str(tmp_path)) == ("freeze=full", "regularizer.blocks=[0,1]", "seed=1")
    assert status.read_overrides(str(tmp_path / "missing")) is None


def test_stage_follows_the_checkpoints_and_the_source_mode(tmp_path):
    for name, ckpts, mode in [("a", [], "train"), ("b", ["source.ckpt"], "train"), ("c", ["source.pt"], "train"),
                              ("d", ["source.pt", "target.ckpt"], "train"), ("e", ["source.pt", "target.pt"], "train"),
                              ("f", [], "scratch"), ("g", [], "pretrained")]:
        write_job(tmp_path, name, "running", checkpoints=ckpts, mode=mode)
    stages = {job.name: job.stage for job in status.sweep_status(tmp_path)["jobs"]}
    assert stages == {"a": "source", "b": "source", "c": "target", "d": "target", "e": "evaluating",
                      "f": "target", "g": "target"}


def test_total_from_sweeper_params_and_optuna_and_unknown(tmp_path):
    write_multirun(tmp_path / "a", ["seed=0,1,2"], {"_target_": BASIC_SWEEPER, "params": {"+ablation/regularizer": "scratch,none,l2"}})
    assert status.expected_jobs(tmp_path / "a") == 9
    write_multirun(tmp_path / "b", ["seed=0"], {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
                                               "n_trials": 20})
    assert status.expected_jobs(tmp_path / "b") == 20
    write_multirun(tmp_path / "c", ["seed=0"], {"_target_": "some.other.Sweeper"})
    assert status.expected_jobs(tmp_path / "c") is None
    write_job(tmp_path / "c", "0", "completed", wall=4.0)
    write_job(tmp_path / "c", "1", "running", age_s=1.0)
    s = status.sweep_status(tmp_path / "c")
    assert s["total"] is None and s["counts"]["not started"] == 0 and s["eta_s"] == pytest.approx(3.0, abs=0.5)
    assert "2 jobs found (total unknown)" in status.format_status(s)
    assert "total unknown, so this covers the running jobs only" in status.format_status(s)
    assert status.expected_jobs(tmp_path / "missing") is None


def test_finished_sweep_and_a_sweep_with_no_completed_job(tmp_path):
    write_multirun(tmp_path / "done", ["seed=0,1"])
    write_job(tmp_path / "done", "0", "completed", wall=3.0)
    write_job(tmp_path / "done", "1", "failed", error="x")
    assert status.format_status(status.sweep_status(tmp_path / "done")).endswith("done: no job running or waiting")
    write_multirun(tmp_path / "new", ["seed=0,1"])
    text = status.format_status(status.sweep_status(tmp_path / "new"))
    assert "not started 2" in text and text.endswith("ETA: unknown until a job completes (2 left)")


def test_nothing_readable_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty" / "plots").mkdir(parents=True)
    for target in (tmp_path / "empty", tmp_path / "missing"):
        assert status.main([str(target)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and "nothing readable under" in captured.err


def run_cli(*args, **kwargs):
    env = os.environ | {"PYTHONPATH": str(Path(status.__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "transferlab", "status", *args], env=env,
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_cli_help_and_no_torch(sweep):
    helped = run_cli("--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: transferlab status") and "--watch" in helped.stdout
    probe = ("import sys; sys.argv = ['transferlab', 'status', sys.argv[1]]\n"
             "from transferlab import cli\n"
             "try:\n    cli.main()\nexcept SystemExit as e:\n    code = e.code\n"
             "print('loaded:', sorted(m for m in ('torch', 'pytorch_lightning', 'lightning', 'matplotlib') if m in sys.modules), code)")
    env = os.environ | {"PYTHONPATH": str(Path(status.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", probe, str(sweep)], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines()[-1] == "loaded: [] 0", out.stderr
    assert "completed 3 · running 3" in out.stdout


def test_watch_refreshes_until_ctrl_c_and_exits_0_quietly(sweep):
    env = os.environ | {"PYTHONPATH": str(Path(status.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "transferlab", "status", str(sweep), "--watch", "0.2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # SIGINT at its default in the child, even where this run inherited it ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    first = proc.stdout.readline()
    while time.monotonic() < deadline and first and "sweep" not in first:
        first = proc.stdout.readline()
    time.sleep(1.0)  # a few refreshes
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and err == ""
    assert (first + out).count(f"sweep {sweep}: 12 jobs") >= 3 and "refreshing every 0.2 s" in out


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_status_of_a_real_multirun_while_it_runs_and_after(tmp_path):
    sweep = tmp_path / "sweep"
    env = os.environ | {"PYTHONPATH": str(Path(status.__file__).parents[1]), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "transferlab", "-m", "seed=0,1,2", "logger=csv", "source.epochs=1", "target.epochs=2",
           "backbone.channels=[8,16]", f"hydra.sweep.dir={sweep}", f"paths.output_root={tmp_path / 'out'}"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    while proc.poll() is None:
        s = status.sweep_status(sweep)
        if s is not None and s["counts"]["running"]:
            seen.append((s["total"], dict(s["counts"]), [j.stage for j in s["jobs"] if j.status == "running"]))
            if len(seen) == 1:
                live = run_cli(str(sweep))
                assert live.returncode == 0 and "running (" in live.stdout
        time.sleep(0.2)
    output = proc.stdout.read()
    assert proc.returncode == 0, output[-3000:]
    assert seen, "never saw a running job"
    total, counts, stages = seen[0]
    assert total == 3 and counts["running"] == 1 and counts["completed"] + counts["not started"] == 2
    assert all(stage in ("starting", "source", "target", "evaluating") for _, _, st in seen for stage in st)
    after = status.sweep_status(sweep)
    assert after["total"] == 3 and after["counts"]["completed"] == 3 and after["counts"]["running"] == 0
    # the mean of the three jobs' own wall times, read here from their results.json
    walls = [json.loads(p.read_text())["provenance"]["wall_time_s"] for p in sweep.glob("*/results.json")]
    assert len(walls) == 3 and min(walls) > 0
    assert after["mean_wall_s"] == pytest.approx(sum(walls) / 3, rel=1e-9) and after["eta_s"] == 0
    finished = run_cli(str(sweep))
    assert finished.returncode == 0 and finished.stdout.rstrip().endswith("done: no job running or waiting")


def test_started_is_the_first_launch_not_the_latest_relaunch(tmp_path):
    """A relaunch rewrites multirun.yaml; a job an earlier launch completed dates the sweep's start."""
    root = tmp_path / "sweep"
    write_multirun(root, ["seed=range(0,3)", "logger=csv"])  # rewritten just now, as by a relaunch
    write_job(root, "0", "completed", wall=600.0, age_s=3000.0)  # finished 3,000 s ago after 600 s
    write_job(root, "1", "running", age_s=10.0)
    assert status.sweep_status(root)["started_s"] == pytest.approx(3600.0, abs=5.0)
    alone = tmp_path / "fresh"
    write_multirun(alone, ["seed=range(0,3)", "logger=csv"])
    assert status.sweep_status(alone)["started_s"] == pytest.approx(0.0, abs=5.0)
