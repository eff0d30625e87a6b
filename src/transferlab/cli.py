"""`transferlab [overrides]` / `python -m transferlab`: compose → validate → run → results.json.

Thin on purpose: all the work is in `experiment.run_experiment`.
"""

from __future__ import annotations

import logging
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
def hydra_entry(cfg: DictConfig) -> None:
    from transferlab.errors import TransferlabError
    from transferlab.experiment import format_summary, run_experiment

    quiet_third_party_logs()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        results = run_experiment(cfg, run_dir)
    except TransferlabError as e:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job and runs the others
        log.error("%s", e)
        print(f"transferlab: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"\n{cfg.name} (seed {cfg.seed}) → {run_dir}\n{format_summary(results)}")
    if (run_dir / "wandb").is_dir():
        print(f"  W&B runs (offline): {run_dir / 'wandb'}  — upload: wandb sync {run_dir / 'wandb'}/offline-run-*")
    print()


def quiet_third_party_logs() -> None:
    """Lightning's banners (GPU available, tips) are noise next to our summary; warnings stay."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero", "pytorch_lightning.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main() -> None:
    register_schemas()
    hydra_entry()


if __name__ == "__main__":
    main()
