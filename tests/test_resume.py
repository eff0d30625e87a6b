"""Exact resume: a run killed (SIGKILL) in the source stage, between stages, in the target stage
(mid-epoch and right after an epoch's last batch) or during evaluation, then started again with
the same command, finishes with the same metrics as a run never interrupted. SIGTERM stops a
run cleanly with a checkpoint. Runs are interrupted at exact steps through the
TRANSFERLAB_KILL_AT hook (stages/checkpointing.py), not by sleeping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Dropout (the RNG), EWC (Fisher and anchors), gradual unfreezing (the schedule's position), the
# learning-rate schedules of both stages (warmup + cosine, linear): everything a resume must
# restore. Digits: 19 target steps per epoch.
RUN = ["logger=csv", "cache=off", "backbone=mlp", "backbone.hidden=[32,32]", "backbone.dropout=0.3",
       "freeze=gradual", "regularizer=ewc", "source.epochs=2", "target.epochs=3", "source.lr=1e-2",
       "target.lr=1e-2", "trainer.checkpoint_interval_s=null", "scheduler=cosine", "target.scheduler.warmup_steps=7",
       "scheduler@source.scheduler=linear"]


def transferlab(run_dir: Path, *overrides: str, kill_at: str | None = None, signal_name: str = "KILL", base=RUN):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("TRANSFERLAB_KILL_AT", None)
    if kill_at:
        env.update(TRANSFERLAB_KILL_AT=kill_at, TRANSFERLAB_KILL_SIGNAL=signal_name)
    return subprocess.run([sys.executable, "-m", "transferlab", *base, *overrides, f"hydra.run.dir={run_dir}"],
                          env=env, capture_output=True, text=True, timeout=600)


def metrics(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed", results["error"]
    # time/* are wall times; cache/* say where a stage came from, not what it computed.
    return {k: v for k, v in results["metrics"].items()
            if not k.startswith(("time/", "cache/", "efficiency/"))}  # measurements, not results


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    done = transferlab(run_dir)
    assert done.returncode == 0, done.stderr
    return metrics(run_dir)


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_killed_at_every_point_resumes_to_identical_metrics(tmp_path, uninterrupted):
    # One run dir, killed again at each later point: every rerun resumes a resumed run.
    # (Checkpoint settings only decide when a run saves, so each run may use its own.)
    points = [("source:step13", 5),   # mid-epoch in the source stage (last checkpoint: step 10)
              ("after:source", 5),    # between the stages
              ("target:step20", 19),  # target epoch 1 (last checkpoint: step 19, the end of epoch 0)
              ("target:step33", 5),   # mid-epoch (last checkpoint: step 30), the freeze schedule at epoch 1
              ("after:target", 5)]    # during evaluation
    left_behind = []
    for point, every_n_steps in points:
        killed = transferlab(tmp_path, f"trainer.checkpoint_every_n_steps={every_n_steps}", kill_at=point)
        assert killed.returncode == -signal.SIGKILL, f"{point}: {killed.stderr[-2000:]}"
        status = json.loads((tmp_path / "results.json").read_text())["status"]
        assert status == "running", f"{point}: a killed run must not look finished ({status})"
        left_behind.append(sorted(p.name for p in (tmp_path / "checkpoints").glob("*.*t")))
    assert left_behind == [["source.ckpt"], ["source.pt"], ["source.pt", "target.ckpt"],
                           ["source.pt", "target.ckpt"], ["source.pt", "target.pt"]]
    finished = transferlab(tmp_path)
    assert finished.returncode == 0, finished.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["provenance"]["resumed"] is True
    assert metrics(tmp_path) == uninterrupted
    assert not list((tmp_path / "checkpoints").glob("*.ckpt")), "a finished stage removes its training checkpoint"


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_sigterm_writes_a_checkpoint_and_stops_cleanly(tmp_path, uninterrupted):
    stopped = transferlab(tmp_path, "logger=wandb", kill_at="target:step7", signal_name="TERM")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "interrupted: stopped by SIGTERM in the target stage at step 7" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "interrupted"
    assert (tmp_path / "checkpoints" / "target.ckpt").is_file()
    resumed = transferlab(tmp_path, "logger=wandb")
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(tmp_path) == uninterrupted
    # W&B: the resumed target stage logs into the run it started (same id; offline, a second
    # folder of that run for `wandb sync`, and a third holding results.json's metrics in its
    # summary), the source stage kept its single run.
    target_id = (tmp_path / "checkpoints" / "wandb-target.id").read_text()
    source_id = (tmp_path / "checkpoints" / "wandb-source.id").read_text()
    runs = [p.name.rsplit("-", 1)[1] for p in (tmp_path / "wandb").glob("offline-run-*")]
    assert sorted(runs) == sorted([source_id, target_id, target_id, target_id])


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_ctrl_c_keeps_what_was_measured_and_the_same_command_resumes(tmp_path, uninterrupted):
    stopped = transferlab(tmp_path, kill_at="target:step5", signal_name="INT")
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert stopped.stderr.count("transferlab: interrupted — rerun the same command to resume") == 1
    assert "Traceback" not in stopped.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "interrupted" and "Ctrl-C in the target stage at step 5" in results["error"]
    # The source stage had finished: its measurements stay (they were {} before).
    assert results["metrics"]["source/test_acc_before"] == uninterrupted["source/test_acc_before"]
    assert (tmp_path / "checkpoints" / "target.ckpt").is_file()
    resumed = transferlab(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert metrics(tmp_path) == uninterrupted


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_a_different_config_does_not_resume_from_stale_checkpoints(tmp_path):
    killed = transferlab(tmp_path, "trainer.checkpoint_every_n_steps=5", kill_at="target:step6")
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "checkpoints" / "target.ckpt").is_file()
    changed = transferlab(tmp_path, "target.lr=5e-3", kill_at="source:step1")
    assert changed.returncode == -signal.SIGKILL
    assert not (tmp_path / "checkpoints" / "target.ckpt").exists(), "another config's checkpoint was kept"
    assert not (tmp_path / "checkpoints" / "source.pt").exists()


# Each baseline's state across a kill: LwF's teacher logits and trained source head, DELTA's start
# copy and channel attention, Co-Tuning's relationship and source head (statistics recomputed or
# taken from the cache; modules inside the checkpointed LightningModule), BSS (stateless),
# surgical fine-tuning (which blocks train). BatchNorm-free MLP with dropout: the RNG matters too.
BASELINES = {"lwf": ["regularizer=lwf"], "delta": ["regularizer=delta"], "bss": ["regularizer=bss"],
             "co_tuning": ["regularizer=co_tuning"], "surgical": ["freeze=surgical", "freeze.train_blocks=[1]"],
             "l2sp+bss": ["regularizer=l2sp", "+regularizer@extra_regularizers.bss=bss"]}


@pytest.mark.slow  # end-to-end runs in subprocesses: CI runs them (.ci/run)
@pytest.mark.parametrize("method", list(BASELINES))
def test_each_baseline_resumes_after_a_kill_to_identical_metrics(tmp_path, method):
    overrides = ["freeze=full", "regularizer=none", *BASELINES[method], "trainer.checkpoint_every_n_steps=19"]
    done = transferlab(tmp_path / "uninterrupted", *overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    killed = transferlab(tmp_path / "killed", *overrides, kill_at="target:step33")  # epoch 1, after step 19's checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoints" / "target.ckpt").is_file()
    resumed = transferlab(tmp_path / "killed", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "killed" / "results.json").read_text())["provenance"]["resumed"] is True
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "uninterrupted")


@pytest.mark.slow  # end-to-end runs in subprocesses: CI runs them (.ci/run)
def test_lwf_on_a_language_model_resumes_after_a_kill_to_identical_metrics(tmp_path):
    """LwF on a language model: its frozen start copy is rebuilt from the start weights, and the
    untied next-token head's start (it trains from the first step) comes back from the checkpoint."""
    import torch
    transformers = pytest.importorskip("transformers")
    from transferlab.backbones.minilm import minilm_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
                                      vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.cls_token_id,
                                      eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    overrides = ["logger=csv", "cache=off", "trainer.checkpoint_interval_s=null", "target.epochs=3", "data=tweets_lm", "backbone=hf_causal", f"backbone.name={tmp_path / 'llama'}",
                 "source=pretrained", "freeze=full", "regularizer=lwf", "data.target_train_size=24",
                 "data.source_train_size=8", "data.test_size=8", "data.val_fraction=0.0005", "data.max_length=24",
                 "target.batch_size=8", "target.lr=1e-3", "evaluate.transferability=false",
                 "trainer.checkpoint_every_n_steps=3"]
    done = transferlab(tmp_path / "uninterrupted", *overrides, base=[])
    assert done.returncode == 0, done.stderr[-2000:]
    killed = transferlab(tmp_path / "killed", *overrides, kill_at="target:step5", base=[])  # epoch 1, after step 3's checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = transferlab(tmp_path / "killed", *overrides, base=[])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "killed" / "results.json").read_text())["provenance"]["resumed"] is True
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "uninterrupted")
