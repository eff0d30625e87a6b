"""Run-dir identity: what a run dir already holds, and whether it is this run.

A completed run of this config is skipped (its results returned); an unfinished one (killed,
preempted, failed) is resumed from its stage checkpoints; a completed run of *another* config is
refused (force=true overwrites it); an unfinished one of another config is started afresh. Two
configs are "the same run" when they agree on every key but the execution keys, a key added to
transferlab since the run was recorded counting as agreeing while it holds a neutral value.

Torch-free: it reads results.json and compares plain config dicts.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transferlab.config import DEFAULT_OPTIMIZER, DEFAULT_SCHEDULER
from transferlab.errors import ConfigError
from transferlab.results import RESULTS_FILE, read_results

log = logging.getLogger(__name__)

# Keys that choose *how* a run is executed, not *what* it computes: ignored when deciding
# whether a run dir already holds this run.
EXECUTION_KEYS = ("force", "cache", "logger", "report", "trainer.num_threads", "trainer.checkpoint_every_n_steps",
                  "trainer.checkpoint_interval_s", "trainer.pin_memory", "trainer.strategy", "trainer.num_nodes",
                  "trainer.gradient_checkpointing", "backbone.gradient_checkpointing")


def identify(run_dir: Path, config: dict) -> tuple[dict | None, bool]:
    """What `run_dir` holds for a run of `config` (resolved, plain): (the recorded results when
    they are a completed run of this config — skip it —, whether an unfinished run of this config
    is there — resume it). A completed run of another config raises ConfigError unless
    config["force"]; an unfinished one of another config is logged (the run starts afresh)."""
    recorded = recorded_run(run_dir)
    previous = completed_run(run_dir, recorded, config)
    resumed = (recorded is not None and recorded.get("status") != "completed"
               and same_config(recorded.get("config", {}), config))
    if recorded is not None and recorded.get("status") != "completed" and not resumed:
        log.info("%s holds an unfinished run of another config (first difference: %s): starting afresh", run_dir,
                 first_difference(comparable(recorded.get("config", {})),
                                  comparable(without_new_neutral_keys(config, recorded.get("config", {})))))
    return previous, resumed


def recorded_run(run_dir: Path) -> dict | None:
    """The results.json already in `run_dir`, if any (an unreadable one counts as none: the run
    reruns and rewrites it)."""
    if not (run_dir / RESULTS_FILE).is_file():
        return None
    try:
        return read_results(run_dir)
    except (OSError, ValueError):
        return None


def completed_run(run_dir: Path, recorded: dict | None, config: dict) -> dict | None:
    """`recorded` (run_dir's results) when it is a completed run of this same config, else None.

    A completed run of a *different* config is never overwritten silently: that is an error.
    """
    if recorded is None or recorded.get("status") != "completed":
        return None
    if not same_config(recorded.get("config", {}), config):
        if config.get("force"):
            return None
        raise ConfigError(f"{run_dir} already holds a completed run of a different config; "
                          "choose another hydra.run.dir / hydra.sweep.dir, or force=true to overwrite it")
    return recorded


def same_config(previous: dict, current: dict) -> bool:
    """Whether a run dir's recorded config is this one, execution keys aside. A key the recorded
    config lacks (added to transferlab since) matches when it holds a neutral value here (null,
    false, empty, or the behaviour every run had before the key existed), so an upgrade does not
    turn every finished sweep into "a different config"."""
    return comparable(previous) == comparable(without_new_neutral_keys(current, previous))


LM_EVAL_OFF = {"tasks": [], "limit": None, "num_fewshot": None, "include_path": None, "batch_size": 8}
# Keys added since runs were first recorded, with the value that reproduces what those runs did.
NEUTRAL_NEW_KEYS = {("source", "optimizer"): DEFAULT_OPTIMIZER, ("source", "scheduler"): DEFAULT_SCHEDULER,
                    ("target", "optimizer"): DEFAULT_OPTIMIZER, ("target", "scheduler"): DEFAULT_SCHEDULER,
                    ("evaluate",): {"transferability": True, "wise_ft_alphas": [], "diagnostics": True,
                                    "lm_eval": LM_EVAL_OFF},
                    ("evaluate", "diagnostics"): True,  # a measurement added since: it trains nothing differently
                    ("evaluate", "lm_eval"): LM_EVAL_OFF,
                    ("data", "ood_test_size"): 2000}


def without_new_neutral_keys(current: dict, previous: dict, path: tuple = ()) -> dict:
    kept = {}
    for key, value in current.items():
        if key not in previous:
            if value in (None, False, [], {}) or NEUTRAL_NEW_KEYS.get((*path, key)) == value:
                continue
        elif isinstance(value, dict) and isinstance(previous[key], dict):
            value = without_new_neutral_keys(value, previous[key], (*path, key))
        kept[key] = value
    return kept


def first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    """The first key (dotted) whose value differs between two configs, with both values."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = first_difference(x, y, f"{prefix}{key}.")
            if found:
                return found
        elif x != y:
            return f"{prefix}{key}: {x!r} then, {y!r} now"
    return None


def comparable(config: dict) -> dict:
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for key in EXECUTION_KEYS:
        section, _, name = key.partition(".")
        if name and isinstance(config.get(section), dict):
            config[section].pop(name, None)
        elif not name:
            config.pop(section, None)
    return config
