"""What happens when a multirun ends (a Hydra callback, configured in conf/hydra/default.yaml):
a summary of every job — completed now, reused from an earlier launch, failed with its error —
the ablation report (with `logger=wandb`, also as one W&B run of the sweep's group: the report's
table as a W&B Table, its figures as images), and a non-zero exit when any job failed."""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("transferlab.sweep")


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = []
        for path in sorted(sweep_dir.rglob("results.json")):
            try:
                runs.append((path, json.loads(path.read_text())))
            except (OSError, ValueError) as e:
                runs.append((path, {"status": "failed", "error": f"unreadable results.json: {e}"}))
        failed = [(p.parent, r.get("error")) for p, r in runs if r.get("status") != "completed"]
        reused = sum(1 for p, r in runs if r.get("status") == "completed"
                     and p.stat().st_mtime < getattr(self, "started", 0))
        print(f"\nsweep {sweep_dir}: {len(runs)} jobs, {len(runs) - len(failed)} completed "
              f"({reused} reused from an earlier launch), {len(failed)} failed")
        for job_dir, error in failed:
            print(f"  FAILED {job_dir.relative_to(sweep_dir)}: {error}")
        if runs:
            try:
                from transferlab.report import write_report

                baseline = OmegaConf.select(config, "report.baseline")  # the paired comparison's reference arm
                written = write_report(sweep_dir, baseline=baseline)
                print(f"  report: {sweep_dir / 'report.md'} ({len(written)} files)")
                backend = OmegaConf.select(config, "logger.backend")
                if getattr(backend, "value", backend) == "wandb":
                    folder = log_report_to_wandb(sweep_dir, config, written)
                    if folder is not None:
                        print(f"  report in W&B: {folder}")
            except Exception as e:  # noqa: BLE001  a report problem must not hide the sweep's outcome
                log.warning("could not write the report for %s: %s: %s", sweep_dir, type(e).__name__, e)
        if failed:
            sys.exit(1)


REPORT_ID_FILE = "report-run.id"  # under <sweep dir>/wandb: a relaunched sweep's report updates the same W&B run


def report_table(csv_path: Path) -> tuple[list[str], list[list]]:
    """report.csv's header and rows, numbers as numbers and blank cells (no value, no interval) as
    None, so W&B's table sorts them."""
    with csv_path.open(newline="") as f:
        header, *rows = list(csv.reader(f))

    def cell(text: str):
        if text == "":
            return None
        if text in ("True", "False"):
            return text == "True"
        try:
            number = float(text)
        except ValueError:
            return text
        return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number

    return header, [[cell(text) for text in row] for row in rows]


def log_report_to_wandb(sweep_dir: Path, config, written: dict[str, Path]) -> Path | None:
    """One W&B run in the sweep's group (the jobs' group: `logger.group`, else the sweep's name),
    job type `report`: report.csv as the W&B Table `report/table` and every PNG figure as an image
    `figures/<name>`, offline unless WANDB_MODE / `logger.mode` say otherwise. Returns its run
    folder; None (with a warning) when W&B fails: the report on disk stands."""
    from transferlab.stages.trainer import choose_wandb_mode

    sweep_dir = Path(sweep_dir)
    logger_cfg = OmegaConf.select(config, "logger") or {}
    group = logger_cfg.get("group") or f"{sweep_dir.parent.name}-{sweep_dir.name}"
    id_file = sweep_dir / "wandb" / REPORT_ID_FILE
    try:
        import wandb

        choose_wandb_mode(SimpleNamespace(logger=SimpleNamespace(mode=logger_cfg.get("mode", "offline"))), sweep_dir)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        run = wandb.init(dir=str(sweep_dir), project=logger_cfg.get("project", "transferlab"),
                         entity=logger_cfg.get("entity"), group=group, job_type="report", name=f"{group}-report",
                         id=run_id, resume="allow", tags=list(logger_cfg.get("tags") or []),
                         settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        try:
            header, rows = report_table(written["report.csv"])
            logged = {"report/table": wandb.Table(columns=header, data=rows)}
            for name, path in sorted(written.items()):
                if path.suffix == ".png":
                    logged[f"figures/{Path(name).stem}"] = wandb.Image(str(path), caption=Path(name).stem)
            run.log(logged)
            run.summary.update({"report/settings": len(rows), "report/figures": len(logged) - 1})
            folder = Path(run.dir).parent
        finally:
            run.finish(exit_code=0)
        return folder
    except Exception as e:  # noqa: BLE001  a W&B problem must not hide the sweep's outcome
        log.warning("could not log the report of %s to W&B: %s: %s", sweep_dir, type(e).__name__, e)
        return None
