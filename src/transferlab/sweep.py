"""What happens when a multirun ends (a Hydra callback, configured in conf/hydra/default.yaml):
a summary of every job — completed now, reused from an earlier launch, failed with its error —
the ablation report, and a non-zero exit when any job failed."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

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
            except Exception as e:  # noqa: BLE001  a report problem must not hide the sweep's outcome
                log.warning("could not write the report for %s: %s: %s", sweep_dir, type(e).__name__, e)
        if failed:
            sys.exit(1)
