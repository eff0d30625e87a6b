"""Exact resume of a stage after a kill, and a clean stop on SIGTERM.

`StageCheckpoint` writes ``<run_dir>/checkpoints/<stage>.ckpt`` (Lightning's full training state:
weights, optimizer, loop progress, every callback's state — the best epoch so far, the
regularizer's anchors and Fisher) at the first batch end after ``trainer.checkpoint_interval_s``
seconds since the last one, and every ``trainer.checkpoint_every_n_steps`` optimizer steps when
set. (A save costs ~15 ms for the small CNN, more than an epoch of digits: time, not epochs, sets
the pace. Any checkpoint resumes exactly, so the pace changes no result.) Its own state adds what Lightning leaves out: the RNG states
(dropout) and the data-loader position, so the resumed run draws exactly the batches and random
numbers the uninterrupted one would have drawn.

On SIGTERM (what SLURM sends before preemption) Lightning's handler sets `received_sigterm`; the
next batch end writes a checkpoint and raises `Preempted`: the run stops cleanly and the same
command resumes it. Ctrl-C (SIGINT) is handled the same way (`Interrupted`, exit 130); a second
Ctrl-C exits at once (the last checkpoint stands).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from transferlab.data.loaders import EpochBatches
from transferlab.errors import Interrupted, Preempted

# Read once: the check runs after every training step.
KILL_AT = os.environ.get("TRANSFERLAB_KILL_AT")


def fault_point(name: str) -> None:
    """Test hook: TRANSFERLAB_KILL_AT=<point> sends this process SIGKILL (or the signal named by
    TRANSFERLAB_KILL_SIGNAL, e.g. TERM) at that point — the resume tests interrupt runs at exact
    steps and between stages this way, not by sleeping. Points: <stage>:step<n>, after:<stage>."""
    if KILL_AT == name:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("TRANSFERLAB_KILL_SIGNAL", "KILL")))
    if name.startswith("after:") and _interrupted.is_set():
        # A Ctrl-C during a stage's last validation lets the stage finish; its result is saved now.
        raise Interrupted(f"Ctrl-C during the {name[6:]} stage (its result is saved)")


_fitting = threading.Event()  # set while a stage trains: SIGTERM then waits for the batch end
_interrupted = threading.Event()  # Ctrl-C seen: the stage stops at the next batch end


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM or Ctrl-C outside training (data prep, evaluation) raises Preempted / Interrupted at
    once: what finished is saved (stage results, checkpoints) and a rerun resumes from it. During
    training, Lightning's own handler flags SIGTERM (ours flags Ctrl-C) and StageCheckpoint stops
    after the current batch. A second Ctrl-C exits at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _interrupted.clear()

    def on_sigterm(signum, frame):
        if not _fitting.is_set():
            raise Preempted("stopped by SIGTERM between training stages; run the same command again to resume")

    def on_sigint(signum, frame):
        if _interrupted.is_set():
            print("transferlab: interrupted again: exiting now (the last checkpoint stands)", file=sys.stderr,
                  flush=True)
            os._exit(Interrupted.exit_code)
        _interrupted.set()
        if not _fitting.is_set():
            raise Interrupted("Ctrl-C between training stages")

    previous = signal.signal(signal.SIGTERM, on_sigterm), signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


@contextlib.contextmanager
def fitting():
    _fitting.set()
    try:
        yield
    finally:
        _fitting.clear()


def stage_checkpoint_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "checkpoints" / f"{stage}.ckpt"


def rng_states() -> dict:
    state = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
              "numpy": {"key": torch.from_numpy(state[1].astype(np.int64)), "pos": int(state[2])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate((3, tuple(states["python"]), None))
    np.random.set_state(("MT19937", states["numpy"]["key"].numpy().astype(np.uint32), states["numpy"]["pos"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class StageCheckpoint(pl.Callback):
    def __init__(self, path: Path, stage: str, sampler: EpochBatches, every_n_steps: int | None = None,
                 interval_s: float | None = None):
        self.path, self.stage, self.sampler = Path(path), stage, sampler
        self.every_n_steps, self.interval_s = every_n_steps, interval_s
        self._position = (0, 0)  # (epoch, batches of it trained) at the last save
        self._last_save = time.monotonic()

    @property
    def state_key(self) -> str:
        return f"StageCheckpoint[{self.stage}]"

    def resume_path(self) -> str | None:
        """The checkpoint to resume from, if an interrupted run left one."""
        return str(self.path) if self.path.is_file() else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if KILL_AT:
            fault_point(f"{self.stage}:step{step}")
        preempted, interrupted = trainer.received_sigterm, _interrupted.is_set()
        due = self.interval_s is not None and time.monotonic() - self._last_save >= self.interval_s
        if trainer.world_size > 1:  # a save is collective: every rank must take rank 0's decision
            preempted, interrupted, due = trainer.strategy.broadcast((preempted, interrupted, due), src=0)
        if preempted or interrupted or due or (self.every_n_steps and step % self.every_n_steps == 0):
            self._position = (trainer.current_epoch, batch_idx + 1)
            self.save(trainer)
        if interrupted and not preempted:
            raise Interrupted(f"Ctrl-C in the {self.stage} stage at step {step}; checkpoint {self.path} written")
        if preempted:
            raise Preempted(f"stopped by SIGTERM in the {self.stage} stage at step {step}; checkpoint "
                            f"{self.path} written: run the same command again to resume")

    def save(self, trainer: pl.Trainer) -> None:
        tmp = self.path.with_suffix(".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, weights_only=False)  # rank 0 writes, all ranks take part
        if trainer.is_global_zero:
            tmp.replace(self.path)  # atomic: a kill mid-write leaves the previous checkpoint intact
        trainer.strategy.barrier("stage checkpoint")
        self._last_save = time.monotonic()

    # -- what Lightning's checkpoint does not hold -------------------------------------------
    def state_dict(self) -> dict:
        epoch, done = self._position
        return {"epoch": epoch, "batches_done": done, "rng": rng_states()}

    def load_state_dict(self, state: dict) -> None:
        set_rng_states(state["rng"])
        self.sampler.resume_at(state["epoch"], state["batches_done"])
