"""How `transferlab report` and `transferlab status` scale with the number of runs in a sweep.

    .venv/bin/python scripts/bench_report.py                        # 1k, 4k, 10k, 16k runs
    .venv/bin/python scripts/bench_report.py --sizes 1000 --template outputs/runs/x/results.json

Synthetic sweeps laid out as Hydra writes them (<sweep>/<job>/results.json, .hydra/{config,hydra,
overrides}.yaml, checkpoints/, csv/<stage>/version_0/metrics.csv, cli.log; multirun.yaml in the
sweep dir), every results.json built from one real one: `--template`, or, by default, one quick
real run made here (`python -m transferlab logger=csv source.epochs=1 target.epochs=1`). 20
settings: 16 transfer arms (regularizer none/l2/l2sp/ewc × freeze full/partial/lp_ft/linear_probe)
and 4 scratch arms (target.lr 1e-3/3e-3/1e-2/3e-2), seeds 0..n/20−1; ~1% failed, ~0.5%
interrupted, 16 running (an array's parallelism), the rest completed with seeded accuracies.

Timed, per size: the report's analysis (load, settings, pairing, summaries), the whole
`write_report` (md/csv/tex and the plots: a fixed cost per swept key and metric, not per run),
and `status.sweep_status` + format; at the largest size ≤ 10k also the `transferlab status` CLI
in a fresh process (interpreter start and imports included). At the first size the previous
report (git `--old-rev`, default fa66208, the commit before issue 14) is timed on the same sweep
and its report.csv compared with the new one byte for byte. New code: the fastest of --repeats (3)
runs; the old report runs once. Wall times on a shared machine are upper bounds; the file cache is
warm (each sweep was just written, or read once before timing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from transferlab import report, status  # noqa: E402

REGULARIZERS = {
    "none": {"_target_": "transferlab.regularizers.none.NoRegularizer"},
    "l2": {"_target_": "transferlab.regularizers.l2.L2", "alpha": 0.01},
    "l2sp": {"_target_": "transferlab.regularizers.l2sp.L2SP", "alpha": 0.1, "beta": 0.01},
    "ewc": {"_target_": "transferlab.regularizers.ewc.EWC", "lam": 100.0, "fisher": False, "normalize": "none"},
}
FREEZES = {
    "full": {"_target_": "transferlab.freeze.full.FullFinetune"},
    "partial": {"_target_": "transferlab.freeze.partial.PartialFreeze", "k": 1},
    "lp_ft": {"_target_": "transferlab.freeze.lp_ft.LPFT", "probe_epochs": 1},
    "linear_probe": {"_target_": "transferlab.freeze.linear_probe.LinearProbe"},
}
SCRATCH_LRS = [0.001, 0.003, 0.01, 0.03]
ARMS = [f"{r}-{f}" for r in REGULARIZERS for f in FREEZES] + [f"scratch-lr{lr}" for lr in SCRATCH_LRS]
RUNNING = 16


def make_template(work: Path) -> Path:
    run_dir = work / "template_run"
    if not (run_dir / "results.json").is_file():
        print("one real run for the template results.json ...", flush=True)
        subprocess.run([sys.executable, "-m", "transferlab", "logger=csv", "source.epochs=1", "target.epochs=1",
                        f"hydra.run.dir={run_dir}", f"paths.output_root={work / 'outputs'}"],
                       check=True, env=os.environ | {"PYTHONPATH": str(ROOT / "src")}, stdout=subprocess.DEVNULL)
    return run_dir / "results.json"


def write_sweep(sweep: Path, n_runs: int, template: dict) -> None:
    """n_runs jobs (a multiple of 20), as a Hydra sweep `+arm=<20 arms> seed=range(0, n/20)`."""
    seeds = n_runs // len(ARMS)
    marker = sweep / ".bench_complete"
    if marker.is_file() and marker.read_text() == f"{n_runs}":
        return
    shutil.rmtree(sweep, ignore_errors=True)
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        "    max_batch_size: null\n    params: null\n"
        f"  overrides:\n    task:\n    - +arm={','.join(ARMS)}\n    - seed=range(0,{seeds})\n    - logger=csv\n")
    rng = random.Random(n_runs)
    running = set(rng.sample(range(n_runs), RUNNING))
    config_text = json.dumps(template["config"])  # .hydra/config.yaml stand-in: what a job carries
    metrics_csv = "epoch,step,train/loss,val/acc\n" + "".join(f"{e},{e * 19},0.5,0.9\n" for e in range(10))
    job = 0
    for a, arm in enumerate(ARMS):
        for seed in range(seeds):
            status_ = "running" if job in running else rng.choices(
                ["completed", "failed", "interrupted"], [0.985, 0.01, 0.005])[0]
            write_job(sweep / str(job), template, arm, a, seed, status_, rng, config_text, metrics_csv)
            job += 1
    marker.write_text(f"{n_runs}")


def write_job(job_dir: Path, template: dict, arm: str, a: int, seed: int, status_: str, rng: random.Random,
              config_text: str, metrics_csv: str) -> None:
    config = json.loads(json.dumps(template["config"]))
    config["seed"] = seed
    if arm.startswith("scratch"):
        config["source"]["mode"] = "scratch"
        config["target"]["lr"] = SCRATCH_LRS[a - 16]
        config["freeze"], config["regularizer"] = FREEZES["full"], REGULARIZERS["none"]
    else:
        reg, freeze = arm.split("-")
        config["regularizer"] = REGULARIZERS[reg] | ({"seed": seed} if reg == "ewc" else {})
        config["freeze"] = FREEZES[freeze]
    scratch = config["source"]["mode"] == "scratch"
    acc = 0.85 + 0.01 * (a % 5) - 0.02 * scratch + rng.gauss(0, 0.01)
    metrics = dict(template["metrics"]) | {
        "target/test_acc": acc, "target/val_acc": acc + rng.gauss(0, 0.005),
        "source/test_acc_before": None if scratch else 0.95, "source/test_acc_after": None if scratch else 0.80,
        "transfer/forgetting": None if scratch else 0.15 + rng.gauss(0, 0.02)}
    provenance = dict(template["provenance"]) | {"seed": seed, "wall_time_s": round(rng.uniform(40, 80), 3)}
    results = {"status": status_, "error": None, "metrics": metrics, "config": config, "provenance": provenance}
    if status_ == "failed":
        results["error"], results["metrics"] = "NonFiniteLossError: the target loss became nan at step 12", {}
    elif status_ == "interrupted":
        results["error"], results["metrics"] = "stopped by SIGTERM in the target stage at step 40", {}
    elif status_ == "running":
        results["metrics"], provenance["wall_time_s"] = {}, None
    hydra_dir = job_dir / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "overrides.yaml").write_text(f"- +arm={arm}\n- seed={seed}\n- logger=csv\n")
    (hydra_dir / "config.yaml").write_text(config_text)
    (hydra_dir / "hydra.yaml").write_text(config_text)
    (job_dir / "cli.log").write_text("[cli][INFO] - cache hit: source 0123456789abcdef0123\n")
    checkpoints = job_dir / "checkpoints"
    checkpoints.mkdir()
    for stage in ("source", "target"):
        if status_ != "running" or stage == "source":
            (checkpoints / f"{stage}.pt").write_bytes(b"\0" * 64)
        csv_dir = job_dir / "csv" / stage / "version_0"
        csv_dir.mkdir(parents=True)
        (csv_dir / "metrics.csv").write_text(metrics_csv)
    (job_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def load_old_report(rev: str):
    """report.py as it was at `rev`, imported under another name."""
    source = subprocess.run(["git", "show", f"{rev}:src/transferlab/report.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "report_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("report_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn, *args, repeats: int = 1):
    """(the fastest of `repeats` wall times, the value): on a shared machine the minimum is the
    least disturbed sample."""
    best = float("inf")
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        value = fn(*args)
        best = min(best, time.perf_counter() - start)
        CPU[fn] = min(CPU.get(fn, float("inf")), time.process_time() - cpu)
    return best, value


CPU: dict = {}  # fn → the smallest CPU time of this process over its runs: what the wall time is on an idle core


def analysis(sweep: Path, module=report) -> list[dict]:
    runs = module.add_gains(module.assign_settings(module.load_runs(sweep)))
    return module.summarize_settings(runs)


def status_once(sweep: Path) -> str:
    return status.format_status(status.sweep_status(sweep))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 10000, 16000])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_report")
    parser.add_argument("--template", type=Path, default=None, help="a results.json (default: one real run made here)")
    parser.add_argument("--repeats", type=int, default=3, help="new code: fastest of this many (the old report runs once)")
    parser.add_argument("--old-rev", default="fa66208", help="git revision of the report to compare with ('' skips)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    template = json.loads((args.template or make_template(args.work)).read_text())
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; template {len(json.dumps(template))} bytes")

    rows = []
    for i, n in enumerate(args.sizes):
        sweep = args.work / f"sweep_{n}"
        t_write, _ = timed(write_sweep, sweep, n, template)
        status_once(sweep)  # warm the file cache the same way for every size
        t_status, text = timed(status_once, sweep, repeats=args.repeats)
        t_analysis, _ = timed(analysis, sweep, repeats=args.repeats)
        t_report, _ = timed(report.write_report, sweep, args.work / f"out_{n}", repeats=args.repeats)
        row = {"n": n, "write": t_write, "analysis": t_analysis, "report": t_report, "status": t_status,
               "cpu": {name: CPU.pop(fn) for name, fn in
                       (("analysis", analysis), ("report", report.write_report), ("status", status_once))}}
        if i == 0 and args.old_rev:
            old = load_old_report(args.old_rev)
            row["old_analysis"], _ = timed(analysis, sweep, old)
            row["old_analysis_cpu"] = CPU.pop(analysis)
            row["old_report"], _ = timed(old.write_report, sweep, args.work / f"out_old_{n}")
            same = (args.work / f"out_old_{n}" / "report.csv").read_bytes() == (args.work / f"out_{n}" / "report.csv").read_bytes()
            row["same_csv"] = same
        if n <= 10000 and n == max(s for s in args.sizes if s <= 10000):
            cli = [sys.executable, "-m", "transferlab", "status", str(sweep)]
            start = time.perf_counter()
            subprocess.run(cli, check=True, stdout=subprocess.DEVNULL, env=os.environ | {"PYTHONPATH": str(ROOT / "src")})
            row["status_cli"] = time.perf_counter() - start
            print(text.splitlines()[1])
        rows.append(row)
        extra = ""
        if "old_report" in row:
            extra = (f"; old analysis {row['old_analysis']:.2f} s = {row['old_analysis'] / row['analysis']:.1f}x "
                     f"(CPU {row['old_analysis_cpu']:.2f} s = {row['old_analysis_cpu'] / row['cpu']['analysis']:.1f}x), "
                     f"old report {row['old_report']:.2f} s = {row['old_report'] / row['report']:.1f}x the new one, "
                     f"report.csv {'identical' if row['same_csv'] else 'DIFFERENT'}")
        if "status_cli" in row:
            extra += f"; `transferlab status` CLI {row['status_cli']:.2f} s"
        print(f"{n:>6} runs (written in {t_write:5.1f} s): analysis {t_analysis:6.2f} s = {1e3 * t_analysis / n:.3f} ms/run, "
              f"write_report {t_report:6.2f} s = {1e3 * t_report / n:.3f} ms/run, "
              f"status {t_status:.2f} s = {1e3 * t_status / n:.3f} ms/run{extra} "
              f"[load average {os.getloadavg()[0]:.1f}]\n{'':>6} CPU time: "
              + ", ".join(f"{k} {v:.2f} s = {1e3 * v / n:.3f} ms/run" for k, v in row["cpu"].items()), flush=True)
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        for key in ("analysis", "report", "status"):
            ratio = (last[key] / last["n"]) / (first[key] / first["n"])
            cpu_ratio = (last["cpu"][key] / last["n"]) / (first["cpu"][key] / first["n"])
            print(f"{key}: time per run at {last['n']} / at {first['n']} = {ratio:.2f} wall, {cpu_ratio:.2f} CPU")


if __name__ == "__main__":
    main()
