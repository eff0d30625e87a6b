"""`transferlab [overrides]` / `python -m transferlab`: compose → validate → run → results.json.
`transferlab report <sweep dir>`: the ablation report of a finished (or partial) sweep.

Thin on purpose: the work is in `experiment.run_experiment` and `report.write_report`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from transferlab.config import register_schemas

log = logging.getLogger("transferlab")


def find_conf_dir() -> Path:
    """conf/ sits inside the installed package (wheel) or at the top of the repo (editable)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise RuntimeError(f"transferlab: no conf/config.yaml next to {here}; reinstall the package")


CONF_DIR = find_conf_dir()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_entry(cfg: DictConfig) -> float | None:
    from transferlab.distributed import launch
    from transferlab.errors import Preempted, TransferlabError
    from transferlab.experiment import format_summary, one_line, run_experiment

    quiet_third_party_logs()
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    share_cpu_with_parallel_jobs(cfg, hydra_cfg)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        results = launch(cfg, run_dir, run_experiment)  # under DDP: one process per rank
    except Preempted as e:  # checkpoint written: stop here (the whole sweep too); rerunning resumes
        print(f"transferlab: interrupted: {e}", file=sys.stderr)
        sys.exit(Preempted.exit_code)
    except Exception as e:
        if in_sweep:
            # The job is recorded as failed in its results.json; the sweep goes on, and its
            # summary (transferlab.sweep) lists the failure and exits non-zero.
            log.error("job failed: %s", one_line(e), exc_info=not isinstance(e, TransferlabError))
            return math.nan if cfg.optimized_metric else None
        if not isinstance(e, TransferlabError):
            raise
        log.error("%s", e)
        print(f"transferlab: error: {e}", file=sys.stderr)
        sys.exit(1)
    if results.get("skipped"):
        print(f"{run_dir}: already completed with this config, skipped (force=true reruns it)")
    elif not in_sweep:
        print(f"\n{cfg.name} (seed {cfg.seed}) → {run_dir}\n{format_summary(results)}")
        if (run_dir / "wandb").is_dir():
            print(f"  W&B runs (offline): {run_dir / 'wandb'}  — upload: wandb sync {run_dir / 'wandb'}/offline-run-*")
        print()
    return objective(cfg, results)


def objective(cfg: DictConfig, results: dict) -> float | None:
    """The value a sweeper optimizes (Optuna maximizes `optimized_metric`)."""
    if not cfg.optimized_metric:
        return None
    value = results["metrics"].get(cfg.optimized_metric)
    if value is None:
        log.error("optimized_metric=%s: not among this run's metrics (%s)", cfg.optimized_metric,
                  ", ".join(sorted(results["metrics"])))
        return math.nan
    return float(value)


def share_cpu_with_parallel_jobs(cfg: DictConfig, hydra_cfg) -> None:
    """Under the joblib launcher, split the cores between jobs: oversubscribed torch threads
    spin against each other and run many times slower than one thread each."""
    import torch

    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
        return
    launcher = hydra_cfg.launcher.get("_target_", "") if hydra_cfg.get("launcher") else ""
    if "joblib" in launcher.lower():
        n_jobs = hydra_cfg.launcher.get("n_jobs", -1)
        cores = os.cpu_count() or 1
        n_jobs = cores if n_jobs in (None, -1) else max(1, int(n_jobs))
        torch.set_num_threads(max(1, cores // n_jobs))


def quiet_third_party_logs() -> None:
    """Lightning's banners (GPU available, tips) are noise next to our summary; warnings stay."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero", "pytorch_lightning.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from transferlab.report import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "status":
        from transferlab.status import main as status_main

        sys.exit(status_main(sys.argv[2:]))
    register_schemas()
    hydra_entry()


if __name__ == "__main__":
    main()
