#!/usr/bin/env python
"""What each fine-tuning method costs per training step, relative to `regularizer=none`, on MiniLM.

    .venv/bin/python scripts/bench_methods.py                 # ~10 min on 2 idle cores
    .venv/bin/python scripts/bench_methods.py --repeats 1 --layers 1   # a minute: the script runs

`experiment=tweets_domain_shift` (pretrained MiniLM-L6 → a 1-epoch source stage on 64 airline
tweets → 400 tweets on other topics, 32 tokens, batch 16, 1 epoch = 25 steps; small validation and
test splits, as evaluation is not what is timed), run through
`run_experiment` for every method with its YAML defaults, so each gets what the experiment gives it
(statistics from the shared stage cache, untimed: the source stage, EWC's Fisher, LwF's teacher
logits, DELTA's channel attention, Co-Tuning's category relationship are computed once by the
first run and reused). A step is timed from Lightning's `on_train_batch_start` to
`on_train_batch_end` (forward, loss terms, backward, penalty gradients, optimizer step) in CPU
time of this process (`time.process_time`: on a machine other jobs share, wall time per step
varies by ±30% and cannot resolve a few percent); a run's number is the median of its steps
after the first 3. Methods run round-robin `--repeats` times (every other round in reverse
order); the ratio is the median over rounds of (method / none in the same round).

Goals (issue 10): methods that add a loss term (LwF, DELTA, BSS, Co-Tuning) ≤ 1.15×, methods that
add a gradient in place (L2, L2-SP, EWC) ≤ 1.03×.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

warnings.filterwarnings("ignore")
for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
    logging.getLogger(name).setLevel(logging.ERROR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

import transferlab.stages.target as target  # noqa: E402
from transferlab.cli import CONF_DIR  # noqa: E402
from transferlab.config import register_schemas  # noqa: E402
from transferlab.experiment import run_experiment  # noqa: E402

GRADIENT_TERM = ("l2", "l2sp", "ewc")
LOSS_TERM = ("lwf", "delta", "bss", "co_tuning")
WARMUP_STEPS = 3


class StepTimer(pl.Callback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.started = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(time.process_time() - self.started)


def step_seconds(overrides: list[str], run_dir: Path) -> tuple[float, float]:
    """The median step time of one run's target stage, and the CPU time of its whole fit (with
    what methods do once when it starts, e.g. DELTA's start features, and the validation passes)."""
    timer, original, fit = StepTimer(), target.fit_stage, []

    def timed_fit(*args, callbacks, **kwargs):
        started = time.process_time()
        try:
            return original(*args, callbacks=[*callbacks, timer], **kwargs)
        finally:
            fit.append(time.process_time() - started)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    target.fit_stage = timed_fit
    try:
        run_experiment(cfg, run_dir)
    finally:
        target.fit_stage = original
    return statistics.median(timer.seconds[WARMUP_STEPS:]), fit[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="MiniLM layers (default: all 6)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(("none", *GRADIENT_TERM, *LOSS_TERM)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register_schemas()
    methods = args.methods.split(",")
    if "none" not in methods:
        methods.insert(0, "none")
    with tempfile.TemporaryDirectory() as tmp:
        base = ["experiment=tweets_domain_shift", "logger=none", "data.target_train_size=400",
                "data.source_train_size=64", "data.max_length=32", "target.epochs=1", "target.batch_size=16",
                "evaluate.transferability=false", f"trainer.num_threads={args.threads}",
                "data.val_fraction=0.02", "data.test_fraction=0.02",  # evaluation is not what is timed
                f"paths.output_root={tmp}/outputs", f"cache.dir={tmp}/cache"]
        if args.layers:
            base.append(f"backbone.num_layers={args.layers}")
        times = {m: [] for m in methods}  # the first round also fills the stage cache (outside the steps)
        fits = {m: [] for m in methods}
        for round_ in range(args.repeats):
            # every other round in reverse order: the machine's drift does not favour either end
            for method in methods if round_ % 2 == 0 else methods[::-1]:
                step, fit = step_seconds(base + [f"regularizer={method}"], Path(tmp) / f"{method}-{round_}")
                times[method].append(step)
                fits[method].append(fit)
    print(f"torch {torch.__version__}, {args.threads} threads, MiniLM layers: {args.layers or 6}, "
          f"load average {os.getloadavg()[0]:.2f}")
    for method in methods:
        print(f"{method}: step CPU ms per round", " ".join(f"{1000 * t:.0f}" for t in times[method]))
    print(f"{'method':<10} {'step CPU ms':>11} {'/ none':>7}  {'goal':<13} {'fit CPU s':>9} {'/ none':>7}")
    for method in methods:
        ratio = statistics.median(t / n for t, n in zip(times[method], times["none"]))
        fit_ratio = statistics.median(t / n for t, n in zip(fits[method], fits["none"]))
        goal = 1.03 if method in GRADIENT_TERM else 1.15 if method in LOSS_TERM else None
        verdict = "" if goal is None else f"<= {goal:.2f}x: {'OK' if ratio <= goal else 'MISS'}"
        print(f"{method:<10} {1000 * statistics.median(times[method]):11.1f} {ratio:6.3f}x  {verdict:<13} "
              f"{statistics.median(fits[method]):9.1f} {fit_ratio:6.3f}x")


if __name__ == "__main__":
    main()
