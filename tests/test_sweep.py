"""Sweeps as a researcher launches them: kill-and-relaunch resumes, failures are listed and
exit non-zero, parallel and submitit launchers share the stage cache, Optuna runs trials."""

from __future__ import annotations

import pytest

import shutil
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from test_cli import FAST, results_under, transferlab
from transferlab.cli import CONF_DIR


def by_job(sweep_dir: Path) -> dict[str, dict]:
    return {Path(r["_dir"]).name: r for r in results_under(sweep_dir)}


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_relaunch_skips_completed_jobs_and_reruns_failed_ones(tmp_path):
    source_file = tmp_path / "saved_source.pt"
    sweep = tmp_path / "out" / "sweep"
    args = ["-m", "source=train,checkpoint", f"source.path={source_file}", *FAST, f"hydra.sweep.dir={sweep}"]

    first = transferlab(*args, cwd=tmp_path)
    assert first.returncode == 1  # job 1 had no checkpoint yet
    assert "2 jobs, 1 completed (0 reused from an earlier launch), 1 failed" in first.stdout
    assert "FAILED 1: source.path=" in first.stdout and "file not found" in first.stdout
    jobs = by_job(sweep)
    assert (jobs["0"]["status"], jobs["1"]["status"]) == ("completed", "failed")
    done_marker = (sweep / "0" / "results.json").stat().st_mtime_ns
    trained_marker = (sweep / "0" / "csv" / "target" / "metrics.csv").stat().st_mtime_ns

    shutil.copyfile(sweep / "0" / "checkpoints" / "source.pt", source_file)
    second = transferlab(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr[-2000:]
    assert "2 jobs, 2 completed (1 reused from an earlier launch), 0 failed" in second.stdout
    assert (sweep / "0" / "results.json").stat().st_mtime_ns == done_marker  # not rerun
    assert (sweep / "0" / "csv" / "target" / "metrics.csv").stat().st_mtime_ns == trained_marker  # not retrained
    jobs = by_job(sweep)
    assert jobs["1"]["status"] == "completed"
    assert jobs["1"]["metrics"]["source/test_acc_before"] == jobs["0"]["metrics"]["source/test_acc_before"]
    assert (sweep / "report.md").is_file()

    forced = transferlab(*args, "force=true", cwd=tmp_path)
    assert forced.returncode == 0 and "0 reused" in forced.stdout


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_joblib_runs_jobs_in_parallel_and_computes_the_shared_source_once(tmp_path):
    sweep = tmp_path / "out" / "jl"
    result = transferlab("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "regularizer=none,l2sp",
                         *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = by_job(sweep)
    assert [jobs[j]["status"] for j in ("0", "1")] == ["completed", "completed"]
    assert sorted(jobs[j]["metrics"]["cache/source_hit"] for j in ("0", "1")) == [False, True]
    logs = "".join((sweep / j / "cli.log").read_text() for j in ("0", "1"))
    assert logs.count("cache miss: source") == 1 and logs.count("cache hit: source") >= 1
    entries = [p for p in (tmp_path / "out" / "cache" / "source").iterdir() if p.is_dir()]
    assert len(entries) == 1


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_submitit_local_runs_two_jobs(tmp_path):
    sweep = tmp_path / "out" / "sub"
    result = transferlab("-m", "hydra/launcher=submitit_local", "seed=0,1", *FAST, f"hydra.sweep.dir={sweep}",
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = by_job(sweep)
    assert {j: r["status"] for j, r in jobs.items()} == {"0": "completed", "1": "completed"}
    assert {r["config"]["seed"] for r in jobs.values()} == {0, 1}
    assert any((sweep / ".submitit").rglob("*_result.pkl"))  # ran through submitit, not in-process


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_optuna_preset_runs_three_trials_and_maximizes_validation_accuracy(tmp_path):
    sweep = tmp_path / "out" / "opt"
    result = transferlab("-m", "hparams_search=l2sp_optuna", "hydra.sweeper.n_trials=3", *FAST,
                         f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = results_under(sweep)
    assert len(runs) == 3 and all(r["status"] == "completed" for r in runs)
    assert len({(r["config"]["target"]["lr"], r["config"]["regularizer"]["alpha"]) for r in runs}) == 3
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(r["metrics"]["target/val_acc"] for r in runs)


def hydra_config(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_slurm_preset_composes_for_a_cluster():
    cfg = hydra_config(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism) == ("gpu", 1, 64)


def test_ablation_presets_sweep_every_arm_with_seeds():
    for preset, group, arms in (("regularizer_ablation", "regularizer", {"scratch", "none", "l2", "l2sp", "ewc"}),
                                ("freeze_ablation", "freeze", {"scratch", "full", "linear_probe", "partial", "lp_ft"})):
        cfg = hydra_config([f"experiment={preset}"])
        params = cfg.hydra.sweeper.params
        assert set(params[f"+ablation/{group}"].split(",")) == arms and params.seed == "0,1,2"
        assert cfg.data.dataset._target_.endswith("load_fashion_mnist")
        for arm in arms:  # every arm composes, and scratch is the no-transfer baseline
            arm_cfg = hydra_config([f"experiment={preset}", f"+ablation/{group}={arm}"])
            assert (arm_cfg.source.mode.value == "scratch") == (arm == "scratch")
