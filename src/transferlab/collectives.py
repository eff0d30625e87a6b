"""Ranks and the few collectives transferlab needs outside Lightning's fit (the Fisher, the
stage cache's decisions, validation counts). Every function is a no-op in a single process.

Under DDP every rank runs the whole experiment and rank 0 alone writes; `launch.py` starts them.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from transferlab.errors import ConfigError


def several_ranks() -> bool:
    """Whether this process is one of several joined in a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def uses_cuda(trainer_cfg) -> bool:
    """Whether the trainer runs on CUDA GPUs (accelerator gpu/cuda, or auto with one visible)."""
    accelerator = trainer_cfg.accelerator
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def check_devices(trainer_cfg) -> None:
    """A GPU accelerator needs a visible CUDA device (config.validate cannot ask: it imports no torch)."""
    if trainer_cfg.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={trainer_cfg.accelerator}: no CUDA GPU is visible here; "
                          "use trainer=cpu (or trainer=ddp_cpu)")


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


def leave_process_group() -> None:
    """Wait for the other ranks, then tear the group down while the interpreter is alive: Gloo's
    worker threads outliving it abort the process at exit ("terminate called without an active
    exception", pytorch#190489), a rank's code -6 after a completed run."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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
