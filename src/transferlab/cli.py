"""`transferlab [overrides]` / `python -m transferlab`: compose → validate → run → results.json.
`transferlab report <sweep dir>`: the ablation report of a finished (or partial) sweep.
`transferlab --help`: the groups and their options, read from conf/ (no torch is imported).

Thin on purpose: the work is in `experiment.run_experiment` and `report.write_report`. This
module imports neither torch nor Lightning at the top, so `--help` and `--cfg job` are fast.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from transferlab.config import register_schemas
from transferlab.errors import ConfigError

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
    from transferlab.errors import Interrupted, Preempted, TransferlabError
    from transferlab.experiment import format_summary, one_line, run_experiment
    from transferlab.launch import launch, quiet_third_party_logs

    quiet_third_party_logs()
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    share_cpu_with_parallel_jobs(cfg, hydra_cfg)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    started = time.time()
    try:
        results = launch(cfg, run_dir, run_experiment)  # under DDP: one process per rank
    except Interrupted as e:  # Ctrl-C: checkpoint written, what was measured kept in results.json
        print(f"transferlab: interrupted — rerun the same command to resume ({e})", file=sys.stderr)
        sys.exit(e.exit_code)
    except Preempted as e:  # checkpoint written: stop here (the whole sweep too); rerunning resumes
        print(f"transferlab: interrupted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:
        if in_sweep:
            # The job is recorded as failed in its results.json; the sweep goes on, and its
            # summary (transferlab.sweep) lists the failure and exits non-zero.
            if not isinstance(e, TransferlabError):
                log.error("job failed: %s", one_line(e), exc_info=True)
            print(job_line(hydra_cfg, f"failed: {one_line(e)}", time.time() - started), flush=True)
            return math.nan if cfg.optimized_metric else None
        if not isinstance(e, TransferlabError):
            raise
        # Printed once: results.json records it too (logging it as well printed it twice).
        print(f"transferlab: error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    if in_sweep:
        status = "skipped (already completed)" if results.get("skipped") else results["status"]
        print(job_line(hydra_cfg, status, time.time() - started, results), flush=True)
    elif results.get("skipped"):
        print(f"{run_dir}: already completed with this config, skipped (force=true reruns it)")
    else:
        print(f"\n{cfg.name} (seed {cfg.seed}) → {run_dir}\n{format_summary(results)}")
        if cfg.cache.enabled:
            print(f"  stage cache: {cfg.cache.dir}")
        if (run_dir / "wandb").is_dir():
            print(f"  W&B runs (offline): {run_dir / 'wandb'}  — upload: wandb sync {run_dir / 'wandb'}/offline-run-*")
        print()
    try:
        return objective(cfg, results, hydra_cfg.get("sweeper", {}).get("direction"))
    except ConfigError as e:  # the search itself is misconfigured: stop it after this first trial
        print(f"transferlab: error: {e}", file=sys.stderr)
        sys.exit(1)


def job_line(hydra_cfg, status: str, wall_s: float, results: dict | None = None) -> str:
    """A multirun job's one line: its number and overrides, status, test primary metric, wall time."""
    overrides = " ".join(hydra_cfg.overrides.task) or "(no overrides)"
    parts = [f"job {hydra_cfg.job.num} [{overrides}]: {status}"]
    primary = ((results or {}).get("task") or {}).get("primary_metric")
    value = (results or {}).get("metrics", {}).get(f"target/test_{primary}") if primary else None
    if value is not None:
        parts.append(f"test_{primary} {value:.4f}")
    parts.append(f"{wall_s:.1f} s")
    return "  ".join(parts)


def objective(cfg: DictConfig, results: dict, direction: str | None = None) -> float | None:
    """The value a sweeper optimizes: `optimized_metric`, else the task's primary validation
    metric. An Optuna `direction` against the primary metric's (maximizing a perplexity) is refused."""
    task = results.get("task") or {}
    name = cfg.optimized_metric or (f"target/val_{task['primary_metric']}" if task.get("primary_metric") else None)
    if name is None:
        return None
    wanted = "maximize" if task.get("higher_is_better", True) else "minimize"
    if direction in ("maximize", "minimize") and direction != wanted and name.endswith(f"_{task.get('primary_metric')}"):
        raise ConfigError(f"hydra.sweeper.direction={direction}, but {name} is better when "
                          f"{'higher' if wanted == 'maximize' else 'lower'}: set hydra.sweeper.direction={wanted}")
    value = results["metrics"].get(name)
    if value is None:
        log.error("optimized_metric=%s: not among this run's metrics (%s)", name, ", ".join(sorted(results["metrics"])))
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


# -- help ----------------------------------------------------------------------------------------
HELP_HEADER = """\
transferlab — transfer-learning experiments: train (or load) a backbone on a source task,
fine-tune it on a target task under a freeze policy and a regularizer, and get target accuracy
selected on validation and tested once, forgetting of the source task, and the scratch baseline
(source=scratch) one override away. Each run writes outputs/runs/<name>/<time>/results.json
(resolved config, git SHA, versions), a CSV log and an offline W&B run; a sweep (-m) writes
outputs/multiruns/<name>/<time>/<job>/ and ends with a report. TRANSFERLAB_OUTPUT moves the root.

usage:
  transferlab [group=option ...] [key=value ...]     one run
  transferlab -m key=a,b seed=0,1,2                   a sweep (Hydra multirun), then its report
  transferlab report <sweep dir>                      the report of a (partial) sweep
  transferlab status <sweep dir> [--watch]            a running sweep: counts, errors, running jobs, ETA
  transferlab soup <sweep dir>                        uniform and greedy model soups of a sweep's runs
  transferlab merge <sweep dir> [method=…] [k=…]      merge fine-tunes of several tasks (TIES, DARE, Fisher, ...)
  transferlab --cfg job [overrides]                   the composed config, without running
  transferlab --hydra-help                            Hydra's own options
"""

HELP_GROUPS = ["data", "backbone", "freeze", "regularizer", "source", "optimizer", "scheduler", "trainer",
               "logger", "cache", "experiment", "study", "hparams_search", "debug"]

HELP_KNOBS = """\
key knobs: seed (0 is a seed), name, target.{epochs,lr,weight_decay,batch_size,early_stopping_patience},
  source.{epochs,lr,weight_decay,batch_size,path}, data.{target_train_size,source_classes,target_classes},
  optimizer@source.optimizer=sgd / scheduler@source.scheduler=cosine (the source stage's recipe),
  target.scheduler.warmup_ratio, force=true (rerun a completed run), cache=off.
examples:
  transferlab regularizer=l2sp
  transferlab optimizer=sgd scheduler=cosine target.scheduler.warmup_ratio=0.1
  transferlab -m experiment=regularizer_ablation && transferlab report outputs/multiruns/regularizer_ablation
"""


def option_summary(path: Path) -> str:
    """An option's one-line description: the first comment line of its YAML (after any
    `# @package` header)."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("# ").strip()
        if line.strip() and not line.startswith("#"):
            break
    return ""


def help_text(width: int = 100) -> str:
    lines = [HELP_HEADER, "config groups (group=option; * marks the default):"]
    defaults = default_choices()
    for group in HELP_GROUPS:
        options = sorted((CONF_DIR / group).glob("*.yaml"))
        if not options:
            continue
        lines.append(f"  {group}:")
        for p in options:
            line = f"    {'*' if defaults.get(group) == p.stem else ' '}{p.stem:<21} {option_summary(p)}"
            lines.append(line if len(line) <= width else line[:width - 1] + "…")
    lines += ["", HELP_KNOBS]
    return "\n".join(lines)


def default_choices() -> dict[str, str]:
    import yaml

    defaults = yaml.safe_load((CONF_DIR / "config.yaml").read_text()).get("defaults", [])
    return {k: v for entry in defaults if isinstance(entry, dict) for k, v in entry.items() if "@" not in k}


class CheckWritableDirs(Callback):
    """Before Hydra creates the run (or sweep) directory: the output and cache folders must be
    writable, else one line naming the path (Hydra's own mkdir would end in a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self.check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.check(config, "hydra.sweep.dir")

    @staticmethod
    def check(config: DictConfig, dir_key: str) -> None:
        folders = [(dir_key, f"point TRANSFERLAB_OUTPUT (or paths.output_root, {dir_key}) at a writable folder")]
        if config.cache.enabled:
            folders.append(("cache.dir", "point TRANSFERLAB_CACHE (or cache.dir) at a writable folder, or cache=off"))
        for key, fix in folders:
            path = Path(str(OmegaConf.select(config, key)))
            problem = unwritable(path)
            if problem:
                print(f"transferlab: error: cannot write to {key}={path} ({problem}): {fix}", file=sys.stderr)
                sys.exit(1)


def unwritable(path: Path) -> str | None:
    """Why `path` could not be created and written, or None. Creates nothing that stays: its
    nearest existing ancestor gets a temporary file."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def main() -> None:
    # Ctrl-C before the run's own handler is installed (imports, composing the config): no traceback.
    try:
        if len(sys.argv) > 1 and sys.argv[1] == "report":
            from transferlab.report import main as report_main

            sys.exit(report_main(sys.argv[2:]))
        if len(sys.argv) > 1 and sys.argv[1] == "status":
            from transferlab.status import main as status_main

            sys.exit(status_main(sys.argv[2:]))
        if len(sys.argv) > 1 and sys.argv[1] == "soup":
            from transferlab.soup import main as soup_main

            sys.exit(soup_main(sys.argv[2:]))
        if len(sys.argv) > 1 and sys.argv[1] == "merge":
            from transferlab.merge import main as merge_main

            sys.exit(merge_main(sys.argv[2:]))
        if len(sys.argv) > 1 and sys.argv[1] in ("--help", "-h"):
            print(help_text())
            return
        register_schemas()
        hydra_entry()
    except KeyboardInterrupt:
        print("\ntransferlab: interrupted — rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
