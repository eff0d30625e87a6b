#!/usr/bin/env python
"""A target stage whose leading blocks are frozen: every epoch through them, computed once per
stage, or taken from the stage cache that every job of a sweep shares (`target.cache_frozen_blocks`,
stages/frozen_prefix.py).

    PYTHONPATH=src .venv/bin/python scripts/bench_frozen_prefix.py --threads 1   # MiniLM-L6, ~15 min
    PYTHONPATH=src .venv/bin/python scripts/bench_frozen_prefix.py --layers 1 --epochs 2 --sweep 3  # quick

`experiment=tweets_sentiment`: pretrained MiniLM-L6, tweets (500 target labels, ~1,200 validation,
~2,000 test), 4 epochs, batch 16, `freeze=linear_probe` (all 7 blocks frozen; `--partial` adds
`freeze=partial freeze.k=4`). Runs, in this process, one after the other:
  off        target.cache_frozen_blocks=false: the blocks run in every epoch;
  stage      cache=off: computed once, in memory, for this stage;
  miss       a fresh stage cache: computed once and written there;
  hit × N    N more jobs on that cache (target.lr varied over N values: the sweep).
For each, the target stage's wall time (`time/target_fit_s`: `train_target`, a cached forward
pass included) and this process's CPU time for the same call (on a shared machine wall times are
upper bounds), and the whole job's wall time. The sweep line compares the N + 1 cached jobs'
stage time with one forward pass of the frozen blocks over train + validation (timed here by
hand) plus N + 1 trainings on cached features (the hits' median). Test predictions of the first
hit (same lr as off) are compared with off's.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
    logging.getLogger(name).setLevel(logging.ERROR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

import transferlab.experiment as experiment  # noqa: E402
from transferlab.cli import CONF_DIR  # noqa: E402
from transferlab.config import register_schemas  # noqa: E402
from transferlab.experiment import run_experiment  # noqa: E402


def config(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def run(overrides: list[str], run_dir: Path) -> dict:
    """One run; returns its metrics, the stage's CPU seconds, and its test predictions."""
    stage_cpu, captured = [], {}
    original = experiment.train_target

    def timed_stage(*args, **kwargs):  # what time/target_fit_s times; keeps the module and data
        start = time.process_time()
        module, info = original(*args, **kwargs)
        stage_cpu.append(time.process_time() - start)
        captured["module"], captured["data"] = module, args[1]
        return module, info

    experiment.train_target = timed_stage
    started = time.perf_counter()
    try:
        metrics = run_experiment(config(overrides), run_dir)["metrics"]
    finally:
        experiment.train_target = original
    job_s = time.perf_counter() - started
    from transferlab.data.loaders import EVAL_BATCH, make_loader
    from transferlab.tasks import outputs

    test = make_loader(captured["data"].target.test, EVAL_BATCH, shuffle=False)
    predicted = outputs(captured["module"], test)[0].argmax(-1).numpy()
    weights = {k: v.detach().clone() for k, v in captured["module"].state_dict().items()}
    return {"metrics": metrics, "cpu": stage_cpu[0], "predicted": predicted, "weights": weights, "job": job_s,
            "data": captured["data"], "module": captured["module"]}


def feature_pass_seconds(module, data, k: int) -> float:
    """One forward pass of blocks 0..k-1 over train + validation, by hand (no cache, no Lightning)."""
    from transferlab.stages.frozen_prefix import cache_split
    from transferlab.tasks import evaluating

    pooled = k == len(module.backbone.blocks)
    started = time.perf_counter()
    with evaluating(module):
        for split in (data.target.train, data.target.val):
            cache_split(module.backbone, k, split, torch.device("cpu"), True, pooled)
    return time.perf_counter() - started


def compare(a: dict, b: dict) -> tuple[int, int, float]:
    same = int((a["predicted"] == b["predicted"]).sum())
    drift = max(float((a["weights"][k] - b["weights"][k]).abs().max()) for k in a["weights"]
                if a["weights"][k].is_floating_point())
    return same, len(a["predicted"]), drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--layers", type=int, default=None, help="MiniLM layers (default: all 6)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sweep", type=int, default=7, help="jobs after the first on one stage cache")
    parser.add_argument("--partial", action="store_true", help="also freeze=partial freeze.k=4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register_schemas()
    base = ["experiment=tweets_sentiment", "logger=none", f"target.epochs={args.epochs}",
            f"trainer.num_threads={args.threads}"]
    if args.layers:
        base.append(f"backbone.num_layers={args.layers}")
    blocks = (args.layers or 6) + 1
    k = min(4, blocks - 1)  # embeddings + k-1 layers frozen
    settings = {"linear_probe": (["freeze=linear_probe"], blocks)}
    if args.partial:
        settings[f"partial k={k}"] = (["freeze=partial", f"freeze.k={k}"], k)
    lrs = [1e-3 * 2 ** (i - 3) for i in range(args.sweep)]  # the sweep's target.lr values after 1e-3
    print(f"torch {torch.__version__}, {args.threads} threads, MiniLM layers: {args.layers or 6}, {args.epochs} epochs")
    print(f"{'setting':<14} {'run':>8} {'stage wall s':>12} {'stage CPU s':>11} {'job wall s':>10} {'test acc':>8}")
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (overrides, frozen) in settings.items():
            def job(label, extra):
                r = run(base + overrides + extra + [f"paths.output_root={tmp}/outputs"], Path(tmp) / f"{name}-{label}")
                print(f"{name:<14} {label:>8} {r['metrics']['time/target_fit_s']:12.2f} {r['cpu']:11.2f} "
                      f"{r['job']:10.1f} {r['metrics']['target/test_acc']:8.4f}", flush=True)
                return r
            cache_dir = f"cache.dir={tmp}/cache-{name.replace(' ', '_')}"
            off = job("off", ["cache=off", "target.cache_frozen_blocks=false"])
            stage = job("stage", ["cache=off"])
            miss = job("miss", [cache_dir])
            hits = [job("hit", [cache_dir])] + [job(f"hit lr{lr:.0e}", [cache_dir, f"target.lr={lr}"])
                                                 for lr in lrs[1:]]
            assert all(h["metrics"]["cache/frozen_blocks_hit"] for h in hits)
            forward = feature_pass_seconds(off["module"], off["data"], frozen)
            stage_s = lambda r: r["metrics"]["time/target_fit_s"]  # noqa: E731
            training = statistics.median(stage_s(h) for h in hits)
            cached_sweep = stage_s(miss) + sum(stage_s(h) for h in hits)
            ideal = forward + (len(hits) + 1) * training
            summary.append((name, off, stage, miss, hits, forward, training, cached_sweep, ideal))
    print()
    for name, off, stage, miss, hits, forward, training, cached_sweep, ideal in summary:
        same, total, drift = compare(hits[0], off)
        n = len(hits) + 1
        print(f"{name}: stage time off / in-stage cache {off['metrics']['time/target_fit_s'] / stage['metrics']['time/target_fit_s']:.1f}x, "
              f"off / stage-cache hit {off['metrics']['time/target_fit_s'] / hits[0]['metrics']['time/target_fit_s']:.1f}x "
              f"(CPU {off['cpu'] / stage['cpu']:.1f}x, {off['cpu'] / hits[0]['cpu']:.1f}x); hit vs off: test predictions "
              f"equal {same}/{total}, largest weight difference {drift:.2e}")
        print(f"  {n}-setting sweep on one cache: target stages {cached_sweep:.1f} s; one feature pass {forward:.1f} s "
              f"+ {n} trainings x {training:.2f} s = {ideal:.1f} s -> {cached_sweep / ideal:.2f}x; without the cache "
              f"~{n} x {off['metrics']['time/target_fit_s']:.1f} s = {n * off['metrics']['time/target_fit_s']:.0f} s; "
              f"whole jobs: off {off['job']:.0f} s, hit median {statistics.median(h['job'] for h in hits):.0f} s")


if __name__ == "__main__":
    sys.exit(main())
