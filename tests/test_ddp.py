"""DDP on 2 CPU processes (gloo): the same results as one process with the same global batch,
the same penalty values, rank 0 alone writing; and DDP jobs inside a Hydra multirun (which
Lightning's own launcher would re-launch as a whole new sweep)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# No dropout and no BatchNorm: with them each rank draws its own masks / batch statistics, so
# the runs would differ by design, not by a bug. EWC covers the Fisher computed across ranks;
# freeze=partial a block frozen before DDP wraps the model (DDP must not expect its gradients).
RUN = ["logger=csv", "backbone=mlp", "backbone.hidden=[32,32]", "freeze=partial", "regularizer=ewc",
       "regularizer.lam=10", "source.epochs=2", "target.epochs=2", "trainer.log_every_n_steps=2"]
# One example in either test split may flip between runs: float sums run in another order.
TOLERANCE = {"acc": 1 / 180, "penalty": 1e-4}


def transferlab(*args: str, cwd: Path):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "transferlab", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def penalties(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "target" / "metrics.csv") as f:
        return {int(row["step"]): float(row["target/penalty"]) for row in csv.DictReader(f) if row.get("target/penalty")}


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_two_processes_match_one_process(tmp_path):
    # Separate stage caches: the DDP run must train its source stage, not reuse the other's.
    single = transferlab(*RUN, f"hydra.run.dir={tmp_path / 'one'}", f"cache.dir={tmp_path / 'cache1'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = transferlab(*RUN, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'ddp'}", f"cache.dir={tmp_path / 'cache2'}",
                      cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "ddp"))
    assert (one["provenance"]["world_size"], two["provenance"]["world_size"]) == (1, 2)
    assert two["status"] == "completed"
    for key in ("target/test_acc", "target/val_acc", "source/test_acc_before", "source/test_acc_after"):
        assert abs(one["metrics"][key] - two["metrics"][key]) <= TOLERANCE["acc"], key
    assert one["metrics"]["target/best_epoch"] == two["metrics"]["target/best_epoch"]
    # The EWC penalty (Fisher summed over both ranks' halves of the source set, anchors, weights)
    # at the same logged steps.
    p1, p2 = penalties(tmp_path / "one"), penalties(tmp_path / "ddp")
    assert p1.keys() == p2.keys() and len(p1) >= 5
    for step in p1:
        assert p2[step] == pytest.approx(p1[step], rel=TOLERANCE["penalty"]), step
    assert p1[max(p1)] > 0
    # Rank 0 alone writes: one CSV log per stage, one cache entry per cached computation.
    assert sorted(p.parent.name for p in tmp_path.joinpath("ddp").rglob("metrics.csv")) == ["source", "target"]
    assert two["metrics"]["cache/source_hit"] is False and two["metrics"]["cache/ewc_statistics_hit"] is False
    entries = sorted(p.parent.parent.name for p in (tmp_path / "cache2").rglob("manifest.json"))
    assert entries == ["frozen_blocks", "method_statistics", "source"]  # partial: block 0 frozen all stage
    assert not [p for p in (tmp_path / "cache2").rglob("*") if ".tmp" in p.name], "a rank left a temporary entry"


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_ddp_jobs_inside_a_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    result = transferlab("-m", *RUN, "trainer=ddp_cpu", "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(sweep.rglob("results.json"))
    assert [p.parent.name for p in runs] == ["0", "1"], "the sweep was re-launched by a DDP rank"
    for path in runs:
        results = json.loads(path.read_text())
        assert results["status"] == "completed" and results["provenance"]["world_size"] == 2
    assert result.stdout.count("Launching 2 jobs locally") == 1


# Loss-term methods: each rank's term is a mean over its share of the global batch, so DDP's
# gradient average is the one-process gradient. (BSS is not: its singular values are of each
# rank's half batch, a per-rank statistic like BatchNorm's.)
@pytest.mark.parametrize("method", ["regularizer=lwf", pytest.param("regularizer=co_tuning", marks=pytest.mark.slow),
                                    pytest.param("regularizer=delta regularizer.attention=false",
                                                 marks=pytest.mark.slow)])
@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_loss_term_methods_match_one_process(tmp_path, method):
    run = ["logger=csv", "backbone=mlp", "backbone.hidden=[32,32]", *method.split(), "source.epochs=1", "target.epochs=2"]
    single = transferlab(*run, f"hydra.run.dir={tmp_path / 'one'}", f"cache.dir={tmp_path / 'c1'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = transferlab(*run, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'ddp'}", f"cache.dir={tmp_path / 'c2'}",
                      cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["metrics"] for d in ("one", "ddp"))
    for key in ("target/test_acc", "target/val_acc", "source/test_acc_after"):
        assert abs(one[key] - two[key]) <= TOLERANCE["acc"], key
