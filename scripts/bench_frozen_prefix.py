#!/usr/bin/env python
"""A target stage whose leading blocks are frozen, with and without computing them once
(`target.cache_frozen_blocks`, stages/frozen_prefix.py).

    PYTHONPATH=src .venv/bin/python scripts/bench_frozen_prefix.py              # MiniLM-L6, minutes
    PYTHONPATH=src .venv/bin/python scripts/bench_frozen_prefix.py --layers 1 --epochs 2   # quick

`experiment=tweets_sentiment`: pretrained MiniLM-L6, tweets (500 target labels, ~1,200 validation,
~2,000 test), 4 epochs, batch 16; `freeze=linear_probe` (all 7 blocks frozen) and `freeze=partial
freeze.k=4` (embeddings + 3 layers frozen). Each setting runs with the cache and without, in this
process, one after the other; the table gives the target stage's wall time (`time/target_fit_s`:
`train_target`, the cached forward pass included) and this process's CPU time for the same call
(`time.process_time`; on a machine other processes share, wall times are upper bounds), and compares the two runs' test predictions (from their saved target
weights) and weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
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
    try:
        metrics = run_experiment(config(overrides), run_dir)["metrics"]
    finally:
        experiment.train_target = original
    from transferlab.data.loaders import EVAL_BATCH, make_loader
    from transferlab.tasks import outputs

    test = make_loader(captured["data"].target.test, EVAL_BATCH, shuffle=False)
    predicted = outputs(captured["module"], test)[0].argmax(-1).numpy()
    weights = {k: v.detach().clone() for k, v in captured["module"].state_dict().items()}
    return {"metrics": metrics, "cpu": stage_cpu[0], "predicted": predicted, "weights": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="MiniLM layers (default: all 6)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["linear_probe", "partial"], help="one of the two settings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register_schemas()
    base = ["experiment=tweets_sentiment", "logger=none", "cache=off", f"target.epochs={args.epochs}",
            f"trainer.num_threads={args.threads}"]
    if args.layers:
        base.append(f"backbone.num_layers={args.layers}")
    k = min(4, args.layers or 6)  # embeddings + k-1 layers frozen
    settings = {"linear_probe": ["freeze=linear_probe"], f"partial k={k}": ["freeze=partial", f"freeze.k={k}"]}
    if args.only:
        settings = {n: o for n, o in settings.items() if n.startswith(args.only)}
    print(f"torch {torch.__version__}, {args.threads} threads, MiniLM layers: {args.layers or 6}, {args.epochs} epochs")
    print(f"{'setting':<14} {'cache':>5} {'stage wall s':>12} {'stage CPU s':>11} {'test acc':>8}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in settings.items():
            result = {}
            for cache in (True, False):
                r = run(base + overrides + [f"target.cache_frozen_blocks={str(cache).lower()}",
                                            f"paths.output_root={tmp}/outputs"], Path(tmp) / f"{name}-{cache}")
                result[cache] = r
                print(f"{name:<14} {'on' if cache else 'off':>5} {r['metrics']['time/target_fit_s']:12.1f} "
                      f"{r['cpu']:11.1f} {r['metrics']['target/test_acc']:8.4f}", flush=True)
            on, off = result[True], result[False]
            same = int((on["predicted"] == off["predicted"]).sum())
            drift = max(float((on["weights"][k] - off["weights"][k]).abs().max()) for k in on["weights"]
                        if on["weights"][k].is_floating_point())
            rows.append((name, off["metrics"]["time/target_fit_s"] / on["metrics"]["time/target_fit_s"],
                         off["cpu"] / on["cpu"], same, len(on["predicted"]), drift))
    print()
    for name, wall, cpu, same, total, drift in rows:
        print(f"{name}: without / with the cache: wall {wall:.2f}x, CPU {cpu:.2f}x; test predictions equal "
              f"{same}/{total}; largest weight difference {drift:.2e}")


if __name__ == "__main__":
    sys.exit(main())
