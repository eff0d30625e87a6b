"""Building a Lightning Trainer and its loggers for one stage.

A CSV log is always written (``<run_dir>/csv/<stage>/metrics.csv``). W&B is added when
``logger.backend=wandb``: offline unless WANDB_MODE or ``logger.mode`` says otherwise, one W&B run
per stage (job_type = stage), grouped by experiment. If W&B cannot start, the run goes on with
the CSV log and a warning: a logging problem never costs local results. Online, a server that
does not answer within 3 s (a node without internet) means offline logging with one warning,
not W&B's own ~90 s init timeout per stage. At the end of a completed run, `log_results_to_wandb`
writes every metric of results.json into the target stage's W&B run's summary.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.parse
import uuid
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from transferlab.data.loaders import eval_batch, make_loader
from transferlab.collectives import is_global_zero, rank_and_world_size, uses_cuda
from transferlab.errors import Preempted
from transferlab.stages.checkpointing import StageCheckpoint, fitting, stage_checkpoint_path
from transferlab.stages.progress import progress_callbacks

log = logging.getLogger(__name__)

# Lightning warns about single-process data loading; our loaders index in-memory tensors.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
# A mid-epoch resume is exact here: StageCheckpoint restores the loader's position (EpochBatches).
warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")
# Our validation metrics are summed across DDP ranks before self.log (TaskModule).
warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")


def make_loggers(cfg, run_dir: Path, stage: str) -> list[Logger]:
    if not is_global_zero():
        return []  # under DDP rank 0 alone logs
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="csv", version=stage)]
    backend = getattr(cfg.logger.backend, "value", cfg.logger.backend)
    if backend == "wandb":
        wandb_logger = _wandb_logger(cfg, run_dir, stage)
        if wandb_logger is not None:
            loggers.append(wandb_logger)
    return loggers


def choose_wandb_mode(cfg, run_dir: Path) -> None:
    """WANDB_MODE: the environment's, else `logger.mode`; online with a server that does not
    answer in 3 s: offline, with one warning."""
    os.environ.setdefault("WANDB_MODE", cfg.logger.mode)
    if os.environ["WANDB_MODE"] in ("online", "run", "shared"):
        problem = wandb_unreachable()
        if problem:
            # W&B itself would retry for ~90 s per stage before giving up: decide now, once per
            # process (the next stage sees offline), and keep the run as an offline one to sync.
            os.environ["WANDB_MODE"] = "offline"
            log.warning("W&B: cannot reach %s (%s): logging offline to %s; upload later with wandb sync",
                        wandb_host(), problem, run_dir / "wandb")


def _wandb_logger(cfg, run_dir: Path, stage: str):
    choose_wandb_mode(cfg, run_dir)
    try:
        from pytorch_lightning.loggers import WandbLogger

        logger = WandbLogger(save_dir=str(run_dir), **wandb_run_settings(cfg, run_dir, stage))
        # Lightning always passes `anonymous`, which current W&B warns about on every run.
        logger._wandb_init.pop("anonymous", None)
        logger.experiment  # start the run now, so a failure shows here and not mid-training
        return logger
    except Exception as e:  # noqa: BLE001  any W&B failure: keep going with the CSV log
        log.warning("W&B logging disabled for the %s stage (%s: %s); the CSV log is still written",
                    stage, type(e).__name__, e)
        return None


def wandb_run_settings(cfg, run_dir: Path, stage: str) -> dict:
    """wandb.init's arguments for `stage`'s W&B run (project, group, job type, name, id, config):
    the same for the stage's training and for the results written into it afterwards."""
    import wandb

    sweep_group, sweep_tags = _sweep_identity()
    return dict(
        project=cfg.logger.project, entity=cfg.logger.entity,
        group=cfg.logger.group or sweep_group or cfg.name, job_type=stage,
        tags=[*cfg.logger.tags, *sweep_tags],
        name=f"{cfg.name}-{stage}-seed{cfg.seed}",
        id=wandb_run_id(run_dir, stage), resume="allow",  # a resumed stage continues its W&B run
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )


RESULTS_STAGE = "target"  # the W&B run whose summary holds results.json's metrics


def results_summary(results: dict) -> dict:
    """What a run's W&B summary gets from results.json: every metric (None left out: W&B's table
    sorts a missing value last, a null it would show as text), the run's status, its task block
    (`task/primary_metric`, `task/higher_is_better`, `task/majority_test`) and its wall time."""
    summary = {key: value for key, value in (results.get("metrics") or {}).items()
               if isinstance(value, (bool, int, float, str))}
    summary["status"] = results.get("status")
    task = results.get("task") or {}
    summary |= {f"task/{key}": value for key, value in task.items()
                if isinstance(value, (bool, int, float, str))}
    wall = (results.get("provenance") or {}).get("wall_time_s")
    if wall is not None:
        summary["time/wall_s"] = wall
    return summary


def log_results_to_wandb(cfg, run_dir: Path, results: dict) -> Path | None:
    """At the end of a completed run with `logger=wandb`: every metric of results.json into the
    summary of the target stage's W&B run (the same run id, so `wandb sync` merges them: one row
    of W&B's run table holds the target curves and the run's test metrics, forgetting, WiSE-FT and
    transferability results). Offline (as the stage's run was), this is a second offline folder
    of that run id, `<run dir>/wandb/offline-run-*-<id>-1`; a target stage taken from the stage
    cache trained nothing, and this is then its W&B run's only folder. Rank 0 only; any W&B
    failure is a warning, never the run's outcome. Returns the offline run folder (None: none
    written)."""
    backend = getattr(cfg.logger.backend, "value", cfg.logger.backend)
    if backend != "wandb" or results.get("status") != "completed" or not is_global_zero():
        return None
    choose_wandb_mode(cfg, Path(run_dir))
    try:
        import wandb

        run = wandb.init(dir=str(run_dir), **wandb_run_settings(cfg, Path(run_dir), RESULTS_STAGE))
        try:
            run.summary.update(results_summary(results))
            folder = Path(run.dir).parent  # <run dir>/wandb/offline-run-…/files → its run folder
        finally:
            run.finish(exit_code=0)
        return folder
    except Exception as e:  # noqa: BLE001  the results are in results.json whatever W&B does
        log.warning("W&B: could not write the results into the %s run's summary (%s: %s); results.json has them",
                    RESULTS_STAGE, type(e).__name__, e)
        return None


def wandb_host() -> str:
    import wandb

    return os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url  # the default host moves between versions


def wandb_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why W&B's server cannot be reached within `timeout_s` (None: it can). Name resolution has no
    timeout of its own (a node without a resolver can hang in it), so the probe runs in a thread."""
    url = urllib.parse.urlparse(wandb_host())
    port = url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return outcome[0] if outcome else f"no answer in {timeout_s:.0f} s"


def wandb_run_id(run_dir: Path, stage: str) -> str:
    """The stage's W&B run id, kept beside its checkpoints: a resumed run logs into the same W&B
    run; a fresh run (checkpoints cleared) gets a new one."""
    path = run_dir / "checkpoints" / f"wandb-{stage}.id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id)
    return run_id


def _sweep_identity() -> tuple[str | None, list[str]]:
    """Inside a Hydra multirun: the sweep's name (W&B group) and the job's swept settings (tags)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None, []
    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.sweep.dir)
    tags = [o[:64] for o in hydra_cfg.overrides.task]  # W&B caps a tag at 64 characters
    return f"{sweep_dir.parent.name}-{sweep_dir.name}", tags


def finish_loggers(loggers: list[Logger], exit_code: int) -> None:
    """Close W&B runs with the right exit code (a failed stage must not show as finished)."""
    for logger in loggers:
        logger.finalize("success" if exit_code == 0 else "failed")
        run = getattr(logger, "_experiment", None)
        if run is not None and hasattr(run, "finish"):
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:  # noqa: BLE001
                log.warning("W&B finish failed: %s", e)


def fit_stage(cfg, module: pl.LightningModule, task, *, stage: str, epochs: int, batch_size: int, seed: int,
              callbacks: list[pl.Callback], run_dir: Path, loggers: list[Logger] | None = None) -> pl.Trainer:
    """Train `module` on `task` (train / val splits) for one stage, resuming from the stage's
    checkpoint when an interrupted run left one; the W&B runs are closed with the right exit code."""
    rank, world_size = rank_and_world_size()
    workers = cfg.data.num_workers
    train = make_loader(task.train, batch_size, shuffle=True, seed=seed, rank=rank, world_size=world_size,
                        pin_memory=cfg.trainer.pin_memory, with_index=True, num_workers=workers,
                        augment=cfg.data.augment and getattr(task.train[0], "ndim", 0) == 4)  # images only
    val = make_loader(task.val, eval_batch(task), shuffle=False, rank=rank, world_size=world_size,
                      pin_memory=cfg.trainer.pin_memory, num_workers=workers)
    checkpoint = StageCheckpoint(stage_checkpoint_path(run_dir, stage), stage, train.sampler,
                                 cfg.trainer.checkpoint_every_n_steps, cfg.trainer.checkpoint_interval_s)
    loggers = make_loggers(cfg, run_dir, stage) if loggers is None else loggers
    trainer = make_trainer(cfg, epochs=epochs, loggers=loggers, callbacks=[*callbacks, checkpoint], run_dir=run_dir,
                           stage=stage, monitor=f"{stage}/val_{module.task.primary}")
    resume = checkpoint.resume_path()
    if resume:
        log.info("%s stage: resuming from %s", stage, resume)
    try:
        with fitting():
            trainer.fit(module, train, val, ckpt_path=resume, weights_only=True)
    except SIGTERMException:  # SIGTERM during validation: Lightning stops; the last checkpoint stands
        finish_loggers(loggers, exit_code=Preempted.exit_code)
        raise Preempted(f"stopped by SIGTERM in the {stage} stage; run the same command again to resume "
                        f"from {checkpoint.path}") from None
    except BaseException as e:
        finish_loggers(loggers, exit_code=e.exit_code if isinstance(e, Preempted) else 1)
        raise
    finish_loggers(loggers, exit_code=0)
    return trainer  # the caller saves the stage's result, then removes the stage checkpoint


def stage_device(trainer_cfg) -> torch.device:
    """Where a model runs outside `fit` (test evaluation, EWC's Fisher): the trainer's accelerator.
    Lightning's teardown moves the model back to the CPU after every fit; `torch.device("cuda")`
    is the current CUDA device, the one Lightning selected for this process."""
    return torch.device("cuda" if uses_cuda(trainer_cfg) else "cpu")


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


def make_trainer(cfg, *, epochs: int, loggers: list[Logger], callbacks: list[pl.Callback],
                 run_dir: Path, stage: str | None = None, monitor: str | None = None) -> pl.Trainer:
    """With `stage`, the progress display `trainer.progress_bar` asks for (a bar or a line per
    epoch showing `monitor`, see progress.py); without, none."""
    t = cfg.trainer
    if t.strategy == FSDP_STRATEGY:
        register_fsdp_strategy()
    progress, bar = progress_callbacks(t.progress_bar, stage, monitor) if stage else ([], False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        sync_batchnorm=t.sync_batchnorm,
        precision=t.precision,
        deterministic=t.deterministic,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val,
        enable_progress_bar=bar,
        logger=loggers or False,
        callbacks=[*callbacks, *progress],
        default_root_dir=str(run_dir),
        # Selection is KeepBestWeights' job; the stages write their own checkpoints.
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # Our loaders shard every global batch across DDP ranks themselves (data/loaders.py).
        use_distributed_sampler=False,
    )
    if t.deterministic:
        # Deterministic mode also fills every new uninitialized tensor with NaN (a debugging
        # aid: kernels overwrite that memory anyway). It costs ~5% of a small CNN's step and
        # changes no result, so keep the deterministic kernels and drop the fill.
        torch.utils.deterministic.fill_uninitialized_memory = False
    return trainer
