"""`transferlab status <sweep dir> [--watch [SECONDS]]`: where a running (or finished) sweep stands.

Read from the job directories alone, with the standard library, yaml and (for the job count)
Hydra's override parser — never torch or Lightning — so it answers in well under 2 s on a
10,000-job sweep and can be rerun every few seconds (`--watch`).

- A *job* is a directory under the sweep dir holding a results.json or a .hydra/ folder (Hydra
  writes .hydra/ before the job starts; the walk does not look inside jobs or hidden folders).
- Its status is results.json's: completed / running / failed / interrupted; a results.json that
  does not parse is *unreadable*; a job with .hydra/ but no results.json yet is running (stage
  "starting").
- The total comes from the sweep's multirun.yaml (written by Hydra when the sweep starts): the
  basic sweeper's product of swept values (hydra.sweeper.params + the command-line overrides), or
  Optuna's n_trials. Jobs of that total without a directory are *not started*.
- A running job's stage comes from its checkpoints/: target.pt → evaluating; target.ckpt or
  source.pt (or a source.mode with no source stage) → target; else source. Age is the time since
  its results.json was written (the job's start), last write the newest file in checkpoints/ or
  csv/ (a job whose last write is long past may be dead: a killed job cannot record it).
- ETA = (Σ over running jobs of max(w − age, 0) + Σ over jobs not started of w) / max(running
  jobs, 1): the rest of the sweep at the parallelism it has now. w is a job's expected wall time
  (provenance.wall_time_s): the mean over the completed jobs of its *arm* (its overrides but the
  seed, from .hydra/overrides.yaml; the jobs not started are multirun.yaml's expansion less the
  jobs found), so a scratch arm with no source stage counts what it costs; the mean over every
  completed job for an arm with none completed yet, or when the jobs cannot be told apart.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from transferlab.results import RESULTS_FILE, natural_key

STATUSES = ("completed", "running", "failed", "interrupted", "unreadable", "not started")
LISTED = 20  # jobs listed per section; the rest are counted
NO_SOURCE_STAGE = ("scratch", "pretrained", "checkpoint")  # source.mode values that train no source
MAX_DEPTH = 4  # job dirs nested deeper than sweep/a/b/c/d are not looked for


@dataclass
class Job:
    name: str
    status: str
    error: str | None = None
    wall_time_s: float | None = None
    age_s: float | None = None  # running jobs: since results.json was written
    last_write_s: float | None = None  # running jobs: since the newest checkpoint or log file
    stage: str | None = None
    finished_s: float | None = None  # completed jobs: since results.json was last written
    overrides: tuple[str, ...] | None = None  # .hydra/overrides.yaml, sorted; None: not readable


def find_jobs(sweep_dir: Path) -> list[Job]:
    """Every job under sweep_dir, in natural order (2 before 10). Plain strings, not Paths:
    pathlib's parsing costs as much as reading the file, 10,000 times over."""
    root = os.fspath(sweep_dir)
    jobs, pending, now = [], [(root, 0)], time.time()
    while pending:
        folder, depth = pending.pop()
        try:
            entries = [e.path for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]
        except OSError:
            continue
        for path in entries:
            job = read_job(path, path[len(root) + 1:], now)
            if job is not None:
                jobs.append(job)
            elif depth + 1 < MAX_DEPTH:
                pending.append((path, depth + 1))
    jobs.sort(key=lambda job: natural_key(job.name))
    return jobs


# results.json as write_results lays it out: status first, provenance (wall_time_s) last. A
# completed job needs only those two, so it is not parsed whole; anything else is.
STATUS_RE = re.compile(rb'\{\s*"status":\s*"([a-z]+)"')
WALL_RE = re.compile(rb'"wall_time_s":\s*([-+0-9.eE]+|null)\s*[,}]')


def read_job(job_dir: str, name: str, now: float) -> Job | None:
    """The job in job_dir, or None when job_dir is not a job (no results.json, no .hydra/)."""
    job = read_job_status(job_dir, name, now)
    if job is not None:
        job.overrides = read_overrides(job_dir)
    return job


def read_overrides(job_dir: str) -> tuple[str, ...] | None:
    """The job's command-line overrides (Hydra's .hydra/overrides.yaml, a list of strings), sorted.
    Plain `- key=value` lines are read as they are; anything else goes through yaml."""
    try:
        with open(os.path.join(job_dir, ".hydra", "overrides.yaml")) as f:
            text = f.read()
    except OSError:
        return None
    lines = text.splitlines()
    if all(line.startswith("- ") and line[2:3] not in ("'", '"') for line in lines):
        return tuple(sorted(line[2:] for line in lines))
    try:
        listed = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or []
        return tuple(sorted(str(o) for o in listed))
    except yaml.YAMLError:
        return None


def read_job_status(job_dir: str, name: str, now: float) -> Job | None:
    path = os.path.join(job_dir, RESULTS_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        hydra = os.path.join(job_dir, ".hydra")
        if not os.path.isdir(hydra):
            return None
        since = age(hydra, now)
        return Job(name, "running", stage="starting", age_s=since, last_write_s=since)
    except OSError as e:
        return Job(name, "unreadable", error=f"{RESULTS_FILE}: {e.strerror or e}")
    head = STATUS_RE.match(data)
    if head is not None and head.group(1) == b"completed":
        wall = WALL_RE.search(data, max(data.rfind(b'"wall_time_s"'), 0))
        if wall is not None:
            return Job(name, "completed", wall_time_s=None if wall.group(1) == b"null" else float(wall.group(1)),
                       finished_s=age(path, now))
    try:
        results = json.loads(data)
        status = str(results["status"])
    except (ValueError, KeyError, TypeError) as e:  # half-written by a non-atomic copy, or not ours
        return Job(name, "unreadable", error=f"{RESULTS_FILE} does not parse ({type(e).__name__})")
    job = Job(name, status, error=results.get("error"),
              wall_time_s=(results.get("provenance") or {}).get("wall_time_s"))
    if status == "running":
        job.age_s = age(path, now)
        job.stage = running_stage(Path(job_dir), results.get("config") or {})
        job.last_write_s = min([job.age_s or 0.0, *(now - t for t in log_times(Path(job_dir)))])
    return job


def age(path: str | Path, now: float) -> float | None:
    try:
        return max(now - os.stat(path).st_mtime, 0.0)
    except OSError:
        return None


def running_stage(job_dir: Path, config: dict) -> str:
    try:
        names = set(os.listdir(job_dir / "checkpoints"))
    except OSError:
        names = set()
    if "target.pt" in names:
        return "evaluating"
    if "target.ckpt" in names or "source.pt" in names:
        return "target"
    if (config.get("source") or {}).get("mode") in NO_SOURCE_STAGE:
        return "target"
    return "source"


def log_times(job_dir: Path) -> list[float]:
    """mtimes of the files a live job writes: checkpoints/*, csv/<stage>/metrics.csv (and one
    level deeper, csv/<stage>/version_*/metrics.csv)."""
    times = []
    folders = [job_dir / "checkpoints", job_dir / "csv" / "source", job_dir / "csv" / "target"]
    while folders:
        folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir():
                    folders += [Path(entry.path)] if folder.parent.name == "csv" else []
                else:
                    times.append(entry.stat().st_mtime)
            except OSError:
                pass
    return times


def expected_jobs(sweep_dir: Path) -> int | None:
    """How many jobs the sweep launches, from its multirun.yaml; None when it cannot tell."""
    return job_count(planned_jobs(sweep_dir))


def job_count(planned: list | int | None) -> int | None:
    return planned if planned is None or isinstance(planned, int) else len(planned)


def planned_jobs(sweep_dir: Path) -> list[tuple[str, ...]] | int | None:
    """The jobs the sweep launches, from its multirun.yaml: each job's overrides (sorted), or only
    their number (Optuna's n_trials); None when it cannot tell."""
    try:
        config = yaml.load((sweep_dir / "multirun.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        hydra = config["hydra"]
        sweeper = hydra.get("sweeper") or {}
        if sweeper.get("n_trials") is not None:  # Optuna and friends
            return int(sweeper["n_trials"])
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return None
        # What BasicSweeper.sweep does: its params, then the command line, parsed and multiplied out.
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        arguments = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        arguments += list((hydra.get("overrides") or {}).get("task") or [])
        parsed = OverridesParser.create().parse_overrides(arguments)
        return [tuple(sorted(job)) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # noqa: BLE001  no multirun.yaml, another sweeper, an override we cannot expand
        return None


def first_launch(sweep_dir: Path, jobs: list[Job]) -> float | None:
    """Seconds since the sweep first started: Hydra rewrites multirun.yaml at every relaunch, but a
    job completed by an earlier launch keeps its results.json, which dates its start (finished −
    wall time)."""
    starts = [job.finished_s + job.wall_time_s for job in jobs
              if job.finished_s is not None and isinstance(job.wall_time_s, (int, float))]
    launched = age(sweep_dir / "multirun.yaml", time.time())
    return max([*starts, *([launched] if launched is not None else [])], default=None)


def sweep_status(sweep_dir: str | Path) -> dict | None:
    """{"sweep_dir", "jobs": [Job], "total": int | None, "counts": {status: n}, "eta_s",
    "mean_wall_s", "started_s"}; None when nothing under sweep_dir is readable."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return None
    jobs, planned = find_jobs(sweep_dir), planned_jobs(sweep_dir)
    total = job_count(planned)
    if not jobs and total is None:
        return None
    counts = dict.fromkeys(STATUSES, 0)
    for job in jobs:
        counts[job.status if job.status in counts else "unreadable"] += 1
    counts["not started"] = max((total or 0) - len(jobs), 0)
    walls = [job.wall_time_s for job in jobs if job.status == "completed" and isinstance(job.wall_time_s, (int, float))]
    mean_wall = sum(walls) / len(walls) if walls else None
    eta, per_arm = None, False
    if mean_wall is not None:
        expected = expected_wall(jobs, mean_wall)
        running = [job for job in jobs if job.status == "running"]
        work = sum(max(expected(job.overrides) - (job.age_s or 0.0), 0.0) for job in running)
        per_arm = isinstance(planned, list) and all(job.overrides is not None for job in jobs)
        if per_arm:
            work += sum(expected(o) for o in (Counter(planned) - Counter(job.overrides for job in jobs)).elements())
        else:
            work += counts["not started"] * mean_wall
        eta = work / max(len(running), 1)
    started = first_launch(sweep_dir, jobs)
    return {"sweep_dir": sweep_dir, "jobs": jobs, "total": total, "counts": counts, "eta_s": eta,
            "mean_wall_s": mean_wall, "n_walls": len(walls), "started_s": started, "per_arm": per_arm}


def arm(overrides: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(o for o in overrides if not o.startswith("seed="))


def expected_wall(jobs: list[Job], mean_wall: float):
    """overrides → the expected wall time of a job with them: its arm's mean over completed jobs,
    else `mean_wall`."""
    walls: dict[tuple, list[float]] = {}
    for job in jobs:
        if job.status == "completed" and job.overrides is not None and isinstance(job.wall_time_s, (int, float)):
            walls.setdefault(arm(job.overrides), []).append(job.wall_time_s)

    def expected(overrides: tuple[str, ...] | None) -> float:
        same = walls.get(arm(overrides)) if overrides is not None else None
        return sum(same) / len(same) if same else mean_wall
    return expected


def duration(seconds: float | None) -> str:
    """3 s, 4m05s, 2h07m, 3d04h."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_status(status: dict) -> str:
    jobs, counts, total = status["jobs"], status["counts"], status["total"]
    size = f"{total} jobs (multirun.yaml)" if total is not None else f"{len(jobs)} jobs found (total unknown)"
    started = f", started {duration(status['started_s'])} ago" if status["started_s"] is not None else ""
    lines = [f"sweep {status['sweep_dir']}: {size}{started}",
             "  " + " · ".join(f"{s} {counts[s]}" for s in STATUSES if counts[s] or s in ("completed", "running", "failed"))]
    width = max([len(job.name) for job in jobs] + [4])
    for label in ("failed", "interrupted", "unreadable"):
        listed = [job for job in jobs if job.status == label or (label == "unreadable" and job.status not in STATUSES)]
        if listed:
            lines.append(f"{label} ({len(listed)}):")
            lines += [f"  {job.name:<{width}}  {one_line(job.error)}" for job in listed[:LISTED]]
            lines += [f"  … and {len(listed) - LISTED} more"] if len(listed) > LISTED else []
    running = sorted((job for job in jobs if job.status == "running"), key=lambda job: -(job.age_s or 0.0))
    if running:
        lines.append(f"running ({len(running)}, oldest first):")
        lines += [f"  {job.name:<{width}}  {job.stage:<10}  age {duration(job.age_s):>7}   "
                  f"last write {duration(job.last_write_s)} ago" for job in running[:LISTED]]
        lines += [f"  … and {len(running) - LISTED} more"] if len(running) > LISTED else []
    lines.append(eta_line(status))
    return "\n".join(lines)


def eta_line(status: dict) -> str:
    counts = status["counts"]
    left = counts["running"] + counts["not started"]
    if left == 0:
        return "done: no job running or waiting"
    if status["mean_wall_s"] is None:
        return f"ETA: unknown until a job completes ({left} left)"
    basis = (f"mean wall time {status['mean_wall_s']:.1f} s over {status['n_walls']} completed; "
             f"{counts['not started']} not started, {counts['running']} running")
    if status.get("per_arm"):
        basis += "; each job weighted by its arm's mean"
    if status["total"] is None:
        basis += "; total unknown, so this covers the running jobs only"
    return f"ETA ≈ {duration(status['eta_s'])} ({basis})"


def one_line(error: str | None, width: int = 200) -> str:
    text = " ".join(str(error or "(no error recorded)").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="transferlab status",
        description="Where a sweep stands: jobs completed / running / failed / interrupted / not started, "
                    "the errors so far, each running job's stage and age, and an ETA. Reads the job "
                    "directories only (fast; safe to run while the sweep runs, e.g. on a SLURM login node).")
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory, e.g. outputs/multiruns/<name>/<time>")
    parser.add_argument("--watch", nargs="?", type=float, const=5.0, default=None, metavar="SECONDS",
                        help="refresh every SECONDS (default 5) until Ctrl-C")
    args = parser.parse_args(argv)
    try:
        while True:
            status = sweep_status(args.sweep_dir)
            if status is None:
                print(f"transferlab status: error: nothing readable under {args.sweep_dir} "
                      f"(no job directory with {RESULTS_FILE} or .hydra/, no multirun.yaml)", file=sys.stderr)
                return 2
            text = format_status(status)
            if args.watch is None:
                print(text)
                return 0
            clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
            print(f"{clear}{text}\n(refreshing every {args.watch:g} s; Ctrl-C stops)", flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
