"""results.json: the one file a run leaves for reports and sweeps.

{"status": "running"|"completed"|"failed"|"interrupted", "error": null|str, "metrics": {...},
 "task": {"kind", "primary_metric", "majority_test"}, "config": <resolved config>,
 "provenance": {"git_sha", "git_dirty", "versions", "seed", "wall_time_s", "resumed", "world_size"}}

It is written when the run starts (status running, so a killed run is never taken as completed)
and rewritten, atomically, when it ends.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

from transferlab.files import atomic_write_text

RESULTS_FILE = "results.json"
PACKAGES = ["transferlab", "torch", "pytorch-lightning", "hydra-core", "omegaconf", "wandb", "numpy", "scikit-learn"]


def write_results(run_dir: Path, results: dict) -> Path:
    return atomic_write_text(Path(run_dir) / RESULTS_FILE, json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")


def read_results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / RESULTS_FILE).read_text())


NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")  # a decimal number, exponent optional


def natural_key(path: Path | str) -> list:
    """'job10' after 'job2', 'alpha=0.01' after 'alpha=0.001' and before 'alpha=0.1': numbers
    (decimals and exponents too) compare by value (text and numbers alternate, so they line up)."""
    text = path if isinstance(path, str) else path.as_posix()
    parts = NUMBER.split(text)
    return [float(part) if i % 2 else part for i, part in enumerate(parts)]


def git_state() -> tuple[str | None, bool | None]:
    """SHA and dirtiness of the checkout transferlab runs from (None outside a git checkout)."""
    source_dir = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source_dir,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return sha, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
