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
    print(f"\n{cfg.name} (seed {cfg.seed}) → {run_dir}\n{format_summary(results)}\n")


def main() -> None:
    register_schemas()
    hydra_entry()


if __name__ == "__main__":
    main()
