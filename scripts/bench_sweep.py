"""How much does the stage cache save on a fine-tuning sweep?

An 8-setting sweep (freeze ∈ {full, partial, linear_probe, lp_ft} × regularizer ∈ {none, l2sp}),
all sharing one source stage, run twice through `run_experiment`: with a fresh stage cache and with
`cache=off`. From the cache-off runs: S = mean source-stage time, T = mean of everything else per
job. Prints the ideal S + 8T, the naive 8(S + T), the measured times and their ratios.
Goal: the cached sweep within 1.1x of the ideal.

    .venv/bin/python scripts/bench_sweep.py            # Fashion-MNIST (falls back to digits)
    .venv/bin/python scripts/bench_sweep.py --digits   # seconds instead of minutes
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from transferlab.cli import CONF_DIR  # noqa: E402
from transferlab.config import register_schemas  # noqa: E402
from transferlab.experiment import run_experiment  # noqa: E402

SETTINGS = [(f, r) for f in ("full", "partial", "linear_probe", "lp_ft") for r in ("none", "l2sp")]


def sweep(data_overrides: list[str], root: Path, cache: bool) -> list[dict]:
    results = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for i, (freeze, regularizer) in enumerate(SETTINGS):
            cfg = compose("config", overrides=[
                *data_overrides, f"freeze={freeze}", f"regularizer={regularizer}", "logger=csv",
                f"paths.output_root={root}", f"cache={'default' if cache else 'off'}"])
            results.append(run_experiment(cfg, root / f"job{i}"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", action="store_true", help="the small digits task instead of Fashion-MNIST")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    register_schemas()

    fashion = Path("/usr/share/datasets/fashion-mnist").is_dir() and not args.digits
    data = ["data=fashion_mnist", "source.epochs=3", "target.epochs=5"] if fashion else ["data=digits"]
    print(f"bench_sweep: {len(SETTINGS)} settings sharing one source stage, {data[0]}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        naive = sweep(data, Path(tmp) / "off", cache=False)
        naive_s = time.perf_counter() - started
        started = time.perf_counter()
        cached = sweep(data, Path(tmp) / "on", cache=True)
        cached_s = time.perf_counter() - started

    assert all(r["status"] == "completed" for r in naive + cached)
    hits = sum(bool(r["metrics"]["cache/source_hit"]) for r in cached)
    same = all(a["metrics"]["target/test_acc"] == b["metrics"]["target/test_acc"] for a, b in zip(naive, cached))
    source_s = sum(r["metrics"]["time/source_s"] for r in naive) / len(naive)
    rest_s = (naive_s - source_s * len(naive)) / len(naive)
    ideal_s = source_s + len(SETTINGS) * rest_s
    model_naive_s = len(SETTINGS) * (source_s + rest_s)

    print(f"  S (source stage) = {source_s:.2f} s, T (rest of a job) = {rest_s:.2f} s")
    print(f"  ideal  S + 8T    = {ideal_s:7.2f} s")
    print(f"  naive  8(S + T)  = {model_naive_s:7.2f} s   measured without cache: {naive_s:7.2f} s")
    print(f"  with the cache   = {cached_s:7.2f} s   ({hits}/{len(SETTINGS)} source-stage hits; "
          f"identical target metrics: {same})")
    print(f"  cached / ideal   = {cached_s / ideal_s:.3f}x   (goal <= 1.10x)")
    print(f"  naive / cached   = {naive_s / cached_s:.2f}x faster with the cache")


if __name__ == "__main__":
    main()
