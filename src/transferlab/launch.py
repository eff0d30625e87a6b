"""DDP for whole experiments: every rank runs the same `run_experiment`, rank 0 alone writes.

Lightning's own DDP launcher re-runs ``sys.argv`` for ranks > 0; inside a Hydra multirun that
re-launches the whole sweep (Lightning #11300, #15737; Hydra #2070). Here the process that holds
the job owns its ranks instead: `launch` starts one child per rank with the job's *resolved*
config (never the command line), sets the rendezvous environment, and waits for them. Lightning
then sees processes created externally and launches nothing. Under torchrun or SLURM's srun
(the ranks already exist) `launch` just runs the experiment in place.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
from pathlib import Path

from omegaconf import OmegaConf

from transferlab.collectives import check_devices, leave_process_group, ranks_exist, world_size_of
from transferlab.config import Config, register_schemas, validate
from transferlab.errors import ConfigError, Interrupted, Preempted, TransferlabError
from transferlab.results import read_results

log = logging.getLogger(__name__)


def quiet_third_party_logs() -> None:
    """Lightning's banners (GPU available, tips) are noise next to our summary; warnings stay."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero", "pytorch_lightning.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


def launch(cfg, run_dir: Path, run) -> dict:
    """`run(cfg, run_dir)` once per rank; returns rank 0's results (from its results.json)."""
    world_size = world_size_of(cfg)
    if world_size == 1 or ranks_exist():
        results = run(cfg, run_dir)
        leave_process_group()
        return results
    validate(cfg)  # a bad value fails here, once, not in every rank
    check_devices(cfg.trainer)
    if cfg.trainer.num_nodes > 1:
        raise ConfigError(f"trainer.num_nodes={cfg.trainer.num_nodes}: start one process per rank with srun or "
                          "torchrun (e.g. hydra/launcher=slurm with tasks_per_node = trainer.devices)")
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world_size), "NODE_RANK": "0"}
    context = multiprocessing.get_context("spawn")
    ranks = [context.Process(target=_rank_main, args=(config_yaml, str(run_dir), rank, env), daemon=False)
             for rank in range(world_size)]
    for process in ranks:
        process.start()
    # Ctrl-C reaches every rank too (one process group): they checkpoint and stop; this process
    # waits for them instead of dying first and leaving them without a parent.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if threading.current_thread() is threading.main_thread() else None
    try:
        failed = _wait(ranks)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    results = read_results(run_dir)
    if failed or results.get("status") != "completed":
        if failed and failed[1] == Interrupted.exit_code:
            raise Interrupted(results.get("error") or f"Ctrl-C: DDP rank {failed[0]} stopped")
        if results.get("status") == "interrupted":
            raise Preempted(results.get("error") or "interrupted")
        raise TransferlabError(results.get("error") or f"DDP rank {failed[0]} exited with code {failed[1]}")
    return results


def _wait(ranks) -> tuple[int, int] | None:
    """Wait for every rank; when one fails, stop the others (they would block in a collective)."""
    pending = dict(enumerate(ranks))
    failed = None
    while pending:
        for rank, process in list(pending.items()):
            process.join(timeout=0.2)
            if process.exitcode is None:
                continue
            del pending[rank]
            if process.exitcode != 0 and failed is None:
                failed = (rank, process.exitcode)
                for other in pending.values():
                    other.terminate()
    return failed


def _rank_main(config_yaml: str, run_dir: str, rank: int, env: dict) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    from transferlab.experiment import run_experiment  # torch and Lightning: imported in the rank only

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s")
    quiet_third_party_logs()
    register_schemas()
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(config_yaml))
    try:
        run_experiment(cfg, Path(run_dir))
        leave_process_group()
    except Preempted as e:  # SIGTERM 143, Ctrl-C 130
        raise SystemExit(e.exit_code)
    except TransferlabError as e:
        log.error("rank %d: %s", rank, e)
        raise SystemExit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
