"""Finding a sweep's runs and naming their settings.

A run is one results.json read into a dict (`load_run`); a setting is what was swept, minus the
seed (`assign_settings`: from each job's `.hydra/overrides.yaml`, else from the config keys that
differ across runs). Then the small questions every part of the report asks of one run: is it
completed, its source mode, its headline metric and that metric's direction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from transferlab.evidence import primary_metric
from transferlab.results import RESULTS_FILE, natural_key

ALL_RUNS = "(all runs)"  # the label of the one setting of a sweep that varied only the seed
MISSING = object()  # a config key a run does not have
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # yaml.safe_load's loader, in libyaml when built


# ---------------------------------------------------------------------------------------------
# Loading: each results.json read once


def load_runs(sweep_dir: str | Path) -> list[dict]:
    """Every results.json under sweep_dir, in natural directory order (2 before 10).

    Each run: {"dir": Path, "name": dir relative to sweep_dir, "status", "error", "metrics",
    "config", "task": results.json's task block ({} for older runs), "overrides": the job's override
    strings, or None without .hydra/overrides.yaml}.
    An unreadable results.json is a failed run whose error says so.
    """
    root = os.fspath(sweep_dir)
    return [load_run(root, name) for name in sorted(find_run_dirs(root), key=natural_key)]


def find_run_dirs(root: str) -> list[str]:
    """The directories under root holding a results.json, relative to root ("." for root itself).
    It does not look inside a run directory: a run's checkpoints/, csv/ and wandb/ are most of a
    sweep's directories. Plain strings: pathlib's parsing would cost as much as the reading."""
    found, pending = [], [""]
    while pending:
        rel = pending.pop()
        folder = os.path.join(root, rel) if rel else root
        if os.path.isfile(os.path.join(folder, RESULTS_FILE)):
            found.append(rel or ".")
            if rel:
                continue
        try:
            subdirs = [e.name for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        pending += [f"{rel}/{name}" if rel else name for name in subdirs]
    return found


def load_run(root: str, name: str) -> dict:
    folder = os.path.join(root, name) if name != "." else root
    try:
        with open(os.path.join(folder, RESULTS_FILE), "rb") as f:
            results = json.loads(f.read())
    except (OSError, ValueError) as e:
        results = {"status": "failed", "error": f"unreadable {RESULTS_FILE}: {e}"}
    return {
        "dir": Path(folder),
        "name": name,
        "status": results.get("status"),
        "error": results.get("error"),
        "metrics": results.get("metrics") or {},
        "config": results.get("config") or {},
        "task": results.get("task") or {},
        "overrides": read_overrides(os.path.join(folder, ".hydra", "overrides.yaml")),
    }


def read_overrides(path: str) -> list[str] | None:
    """The job's override strings: Hydra writes .hydra/overrides.yaml as a YAML list of strings
    (quoted where an override needs it: `'+note=''x, y'''`). None without the file, or when it is
    not a YAML list."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    try:
        overrides = yaml.load(text, Loader=YAML_LOADER) or []
    except yaml.YAMLError:
        return None
    return [str(o) for o in overrides] if isinstance(overrides, list) else None


# ---------------------------------------------------------------------------------------------
# Settings: what was swept, minus the seed


def assign_settings(runs: list[dict]) -> list[dict]:
    """Each run plus "setting" (its label) and "params" ({swept key: value string})."""
    if runs and all(run["overrides"] is not None for run in runs):
        labelled = override_settings([run["overrides"] for run in runs])
    else:
        labelled = config_settings([run["config"] for run in runs])
    return [run | {"setting": label or ALL_RUNS, "params": params, "setting_overrides": full or ALL_RUNS}
            for run, (label, params, full) in zip(runs, with_display_names(labelled))]


def override_settings(overrides: list[list[str]]) -> list[tuple[str, dict]]:
    kept = [[o for o in job if override_key(o) != "seed"] for job in overrides]
    shared = set.intersection(*(set(job) for job in kept))
    kept = [[o for o in job if o not in shared] for job in kept]
    return [(" ".join(job), {override_key(o): override_value(o) for o in job}) for job in kept]


def with_display_names(labelled: list[tuple[str, dict]]) -> list[tuple[str, dict, str]]:
    """(name, params, the overrides as written) per run. A setting is shown by name in report.md,
    report.tex and every figure alike: a preset's group path goes (`+ablation/baselines=l2sp` →
    `l2sp` when it is the only swept key, else `baselines=l2sp`), and so do `+` / `~`; plain keys
    stay (`regularizer=l2sp`, `target.lr=0.01`). The overrides stay in report.csv's key columns,
    and `--baseline` takes either form. Names that would collide keep the overrides."""
    keys = list(dict.fromkeys(key for _, params in labelled for key in params))
    alone = len(keys) == 1

    def name(params: dict) -> str:
        parts = []
        for key, value in params.items():
            if "/" in key:
                parts.append(value if alone else f"{key.rsplit('/', 1)[1]}={value}")
            else:
                parts.append(f"{key}={value}")
        return " ".join(parts)

    names = [name(params) for _, params in labelled]
    by_name: dict[str, set[str]] = {}
    for shown, (full, _) in zip(names, labelled):
        by_name.setdefault(shown, set()).add(full)
    if any(len(fulls) > 1 for fulls in by_name.values()):
        names = [full for full, _ in labelled]
    return [(shown, params, full) for shown, (full, params) in zip(names, labelled)]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def override_value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def config_settings(configs: list[dict]) -> list[tuple[str, dict]]:
    flat = [flatten(config) for config in configs]
    known = [(leaves, config.get("seed")) for leaves, config in zip(flat, configs) if leaves]  # not unreadable
    keys = list(dict.fromkeys(key for leaves, _ in known for key in leaves))
    swept = [key for key in keys
             if is_swept(key, [leaves.get(key, MISSING) for leaves, _ in known], [seed for _, seed in known])]
    params = [{key: show(leaves[key]) for key in swept if key in leaves} for leaves in flat]
    return [(" ".join(f"{k}={v}" for k, v in p.items()), p) for p in params]


def is_swept(key: str, values: list, seeds: list) -> bool:
    """Differs across runs, and is not the seed: not `seed`, `name`, or a key that equals the
    seed in every run that has it (regularizer.seed, interpolated from seed, exists only for EWC)."""
    if key in ("seed", "name") or len({canonical(v) for v in values}) < 2:
        return False
    follows_seed = all(v == s and not isinstance(v, bool) for v, s in zip(values, seeds) if v is not MISSING)
    return not follows_seed


def flatten(node, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}; lists are leaves."""
    if not isinstance(node, dict):
        return {prefix: node}
    leaves = {}
    for key, value in node.items():
        leaves.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


def canonical(value) -> str:
    return "<missing>" if value is MISSING else json.dumps(value, sort_keys=True, default=str)


def show(value) -> str:
    """A config value as it would be written in an override: l2sp, 0.1, null, [0,1]."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)


# ---------------------------------------------------------------------------------------------
# One run


def is_completed(run: dict) -> bool:
    return run["status"] == "completed"


def source_mode(run: dict) -> str | None:
    return (run["config"].get("source") or {}).get("mode")


def target_class(run: dict, group: str) -> str:
    return str((run["config"].get(group) or {}).get("_target_", ""))


def headline_metric(run: dict) -> str:
    """target/test_<the task's primary metric>."""
    return f"target/test_{primary_metric(run)}"


def headline(run: dict) -> float | None:
    return run["metrics"].get(headline_metric(run))


def higher_is_better(run: dict) -> bool:
    """results.json's task.higher_is_better (absent: true, as for accuracy and F1; false for a
    perplexity or a loss)."""
    return (run.get("task") or {}).get("higher_is_better") is not False


def sign(run: dict) -> float:
    """+1 where higher is better, −1 where lower is: sign · (a − b) > 0 means a is better."""
    return 1.0 if higher_is_better(run) else -1.0
