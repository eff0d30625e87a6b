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
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from transferlab.config import Config, register_schemas, validate
from transferlab.errors import ConfigError, Preempted, TransferlabError
from transferlab.results import read_results

log = logging.getLogger(__name__)

def several_ranks() -> bool:
    """Whether this process is one of several joined in a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def uses_cuda(trainer_cfg) -> bool:
    """Whether the trainer runs on CUDA GPUs (accelerator gpu/cuda, or auto with one visible)."""
    accelerator = trainer_cfg.accelerator
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", 1))
    return int(os.environ.get("SLURM_PROCID", 0)), int(os.environ.get("SLURM_NTASKS", 1))


def is_global_zero() -> bool:
    return rank_and_world_size()[0] == 0


def world_size_of(cfg) -> int:
    t = cfg.trainer
    if not str(t.strategy).startswith(("ddp", "fsdp")):
        return 1
    devices = t.devices if isinstance(t.devices, int) else len(t.devices)
    return devices * t.num_nodes


def ranks_exist() -> bool:
    """Whether an outside launcher (torchrun, srun, our own `launch`) already started the ranks."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", 1)) > 1


def ensure_process_group(cfg) -> None:
    """Join the ranks before the first stage: the EWC Fisher and the stage cache's decisions
    need collectives outside Lightning's fit too (Lightning then reuses this group)."""
    if world_size_of(cfg) == 1 or dist.is_initialized():
        return
    rank, world_size = rank_and_world_size()
    if "MASTER_ADDR" not in os.environ and "SLURM_NTASKS" in os.environ:  # srun: the rendezvous from SLURM
        from lightning_fabric.plugins.environments import SLURMEnvironment

        slurm = SLURMEnvironment()
        os.environ.update(MASTER_ADDR=slurm.main_address, MASTER_PORT=str(slurm.main_port))
    gpu = uses_cuda(cfg.trainer)
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))))
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=30))


def sum_across_ranks(values: list[float]) -> list[float]:
    if not several_ranks():
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def gather_lists(items: list) -> list:
    if not several_ranks():
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def barrier() -> None:
    if several_ranks():
        dist.barrier()


def broadcast_from_zero(value):
    if not several_ranks():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- FSDP (trainer=fsdp) -------------------------------------------------------------------------
FSDP_STRATEGY = "fsdp_layers"


def wrap_transformer_layers(module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy: every transformers layer (decoder or encoder layers all derive from
    GradientCheckpointingLayer) is its own FSDP unit, gathered only while it runs."""
    if recurse:
        return True
    from transformers.modeling_layers import GradientCheckpointingLayer

    return isinstance(module, GradientCheckpointingLayer)


def register_fsdp_strategy() -> None:
    """`trainer.strategy=fsdp_layers`: Lightning's FSDPStrategy with the policy above, by name, so
    the trainer config stays a string (Lightning keeps use_orig_params=True: LoRA's frozen base
    weights and trainable adapters share a layer)."""
    from pytorch_lightning.strategies import FSDPStrategy, StrategyRegistry

    if FSDP_STRATEGY not in StrategyRegistry:
        StrategyRegistry.register(FSDP_STRATEGY, FSDPStrategy, description="FSDP, one unit per transformer layer",
                                  auto_wrap_policy=wrap_transformer_layers)


register_fsdp_strategy()  # every process that builds a Trainer imports this module first


# -- the launcher ------------------------------------------------------------------------------
def launch(cfg, run_dir: Path, run) -> dict:
    """`run(cfg, run_dir)` once per rank; returns rank 0's results (from its results.json)."""
    world_size = world_size_of(cfg)
    if world_size == 1 or ranks_exist():
        return run(cfg, run_dir)
    validate(cfg)  # a bad value fails here, once, not in every rank
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
    failed = _wait(ranks)
    results = read_results(run_dir)
    if failed or results.get("status") != "completed":
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
    from transferlab.cli import quiet_third_party_logs
    from transferlab.experiment import run_experiment  # here: experiment imports this module

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s")
    quiet_third_party_logs()
    register_schemas()
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(config_yaml))
    try:
        run_experiment(cfg, Path(run_dir))
    except Preempted:
        raise SystemExit(Preempted.exit_code)
    except TransferlabError as e:
        log.error("rank %d: %s", rank, e)
        raise SystemExit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
