"""Target stage: a new head on the same backbone, trained under a freeze policy and a
regularizer (both `Method`s, method.py); the best epoch on target *validation* — of the task's
primary metric — is kept (the test split is not looked at)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from pytorch_lightning.callbacks import EarlyStopping

from transferlab.collectives import is_global_zero
from transferlab.data import TransferData
from transferlab.errors import ConfigError
from transferlab.files import atomic_write
from transferlab.freeze import FreezePolicy
from transferlab.heads import classification_head
from transferlab.method import MethodContext
from transferlab.regularizers import Regularizer
from transferlab.stages.callbacks import KeepBestWeights
from transferlab.stages.checkpointing import stage_checkpoint_path
from transferlab.stages.module import TaskModule
from transferlab.stages.frozen_prefix import frozen_prefix_stage
from transferlab.stages.trainer import fit_stage, stage_device
from transferlab.tasks import task_of
from transferlab.weights import start_digest


def target_module(cfg, backbone, head, context: MethodContext, methods, lr_scales) -> TaskModule:
    return TaskModule(backbone, head, stage="target", task=context.task, lr=cfg.target.lr,
                      weight_decay=cfg.target.weight_decay, lr_scales=lr_scales,
                      optimizer=instantiate(cfg.target.optimizer), scheduler=instantiate(cfg.target.scheduler),
                      methods=methods, context=context)


def target_head(backbone, task, context: MethodContext):
    """A new classification head; for language modeling the model's own next-token head goes on
    training — the kept source head itself when the source is measured (so forgetting is what
    the fine-tuned model does on general text)."""
    if task.language_modeling:
        return context.source_head if context.source_head is not None else backbone.language_model_head()
    return classification_head(backbone.feature_dim, task.num_classes)


def train_target(cfg, data: TransferData, backbone, freeze: FreezePolicy, regularizers: list[Regularizer],
                 run_dir: Path, *, context: MethodContext | None = None, cache=None, loggers=None
                 ) -> tuple[TaskModule, dict]:
    """Fit a new head (and the backbone, as the freeze policy allows) and keep the result in
    `checkpoints/target.pt`; a resumed run whose target stage had finished takes its kept weights
    (backbone, head, the methods' modules) and metrics back from there. `context` carries what
    the methods may use (the experiment builds it; None: the backbone and task alone). `cache`:
    the stage cache (cache.StageCache), where outputs of blocks frozen for the whole stage are kept
    across jobs; None: computed in memory for this stage."""
    task = data.target
    context = context if context is not None else MethodContext(backbone=backbone, task=task_of(task))
    head = target_head(backbone, task, context)
    context.head = head
    methods = [freeze, *regularizers]
    names = [m.name for m in methods if m.active]
    if len(set(names)) < len(names):  # a loss term or penalty would be logged, or kept, under another's name
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"two methods are named {twice[0]}: give each extra regularizer its own key "
                          "(+regularizer@extra_regularizers.<key>=<option>)")
    kept = run_dir / "checkpoints" / "target.pt"
    if kept.is_file():
        saved = torch.load(kept, map_location="cpu", weights_only=True)
        module = target_module(cfg, backbone, head, context, methods, freeze.lr_scales(len(backbone.blocks)))
        backbone.load_state_dict(saved["backbone"])
        head.load_state_dict(saved["head"])
        module.method_modules.load_state_dict(saved.get("methods", {}))
        return module, saved["info"]
    # What the stage starts from, by digest (LoRA: the base under its adapters), for `transferlab merge`.
    start = start_digest(backbone.state_dict()) if is_global_zero() else None
    if any(m.uses_start_weights for m in methods):
        context.take_start_weights()  # now, before fit restores a resumed run's weights
    module = target_module(cfg, backbone, head, context, methods, freeze.lr_scales(len(backbone.blocks)))
    monitor = f"target/val_{context.task.primary}"
    best = KeepBestWeights(monitor, context.task.higher_is_better)
    # No-op policies stay out: Lightning calls every hook of every callback on every step.
    callbacks = [m for m in methods if m.active] + [best]
    if cfg.target.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor, mode="max" if context.task.higher_is_better else "min", patience=cfg.target.early_stopping_patience))
    fit_module, fit_task, hit = module, task, None  # frozen blocks computed once: same blocks and head, cached inputs
    if cfg.target.cache_frozen_blocks:
        always_frozen = freeze.always_frozen(len(backbone.blocks), cfg.target.epochs)
        fit_module, fit_task, hit = frozen_prefix_stage(cfg, module, task, always_frozen, stage_device(cfg.trainer),
                                                        methods, cache) or (module, task, None)
    started = time.perf_counter()
    trainer = fit_stage(cfg, fit_module, fit_task, stage="target", epochs=cfg.target.epochs,
                        batch_size=cfg.target.batch_size, seed=cfg.seed + 1, callbacks=callbacks, run_dir=run_dir,
                        loggers=loggers)
    seconds = time.perf_counter() - started
    info = {monitor: best.best_score, "target/best_epoch": best.best_epoch, "target/epochs_run": trainer.current_epoch,
            # ≈ training examples per second (steps × batch size / fit time; a resumed fit overstates it)
            "efficiency/target_samples_per_s": round(trainer.global_step * cfg.target.batch_size / seconds, 1),
            "cache/frozen_blocks_hit": hit}
    if is_global_zero():
        atomic_write(kept, lambda tmp: torch.save({"backbone": backbone.state_dict(), "head": head.state_dict(),
                           "methods": module.method_modules.state_dict(),
                           "target_classes": list(task.classes), "start_digest": start, "info": info}, tmp))
        stage_checkpoint_path(run_dir, "target").unlink(missing_ok=True)  # superseded by target.pt
    return module, info
