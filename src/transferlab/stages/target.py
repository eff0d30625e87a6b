"""Target stage: a new head on the same backbone, trained under a freeze policy and a
regularizer; the best epoch on target *validation* is kept (the test split is not looked at)."""

from __future__ import annotations

from pathlib import Path

import torch
from pytorch_lightning.callbacks import EarlyStopping

from transferlab.data import TransferData
from transferlab.distributed import is_global_zero
from transferlab.freeze import FreezePolicy
from transferlab.heads import classification_head
from transferlab.regularizers import Regularizer
from transferlab.stages.callbacks import KeepBestWeights
from transferlab.stages.module import TaskModule
from transferlab.stages.checkpointing import stage_checkpoint_path
from transferlab.stages.frozen_prefix import frozen_prefix_stage
from transferlab.stages.trainer import fit_stage, stage_device


def selection_metric(task) -> str:
    """What picks the best epoch: entity F1 for token classification, accuracy otherwise."""
    return "target/val_f1" if task.token_level else "target/val_acc"


def train_target(cfg, data: TransferData, backbone, freeze: FreezePolicy, regularizer: Regularizer,
                 run_dir: Path, *, loggers=None) -> tuple[TaskModule, dict]:
    task = data.target
    head = classification_head(backbone.feature_dim, task.num_classes)
    module = TaskModule(backbone, head, task="target", lr=cfg.target.lr, weight_decay=cfg.target.weight_decay,
                        lr_scales=freeze.lr_scales(len(backbone.blocks)),
                        label_names=task.label_names if task.token_level else None)
    path = run_dir / "checkpoints" / "target.pt"
    if path.is_file():  # a resumed run whose target stage had finished: its kept weights and metrics
        saved = torch.load(path, map_location="cpu", weights_only=True)
        backbone.load_state_dict(saved["backbone"])
        head.load_state_dict(saved["head"])
        return module, saved["info"]
    monitor = selection_metric(task)
    best = KeepBestWeights(monitor)
    # No-op policies stay out: Lightning calls every hook of every callback on every step.
    callbacks = [c for c in (freeze, regularizer) if c.active] + [best]
    if cfg.target.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor, mode="max", patience=cfg.target.early_stopping_patience))
    fit_module, fit_task = module, task  # frozen blocks computed once: same blocks and head, cached inputs
    if cfg.target.get("cache_frozen_blocks", True):
        always_frozen = freeze.always_frozen(len(backbone.blocks), cfg.target.epochs)
        fit_module, fit_task = frozen_prefix_stage(cfg, module, task, always_frozen, stage_device(cfg.trainer)) or (module, task)
    trainer = fit_stage(cfg, fit_module, fit_task, stage="target", epochs=cfg.target.epochs, batch_size=cfg.target.batch_size,
                        seed=cfg.seed + 1, callbacks=callbacks, run_dir=run_dir, loggers=loggers)
    info = {monitor: best.best_score, "target/best_epoch": best.best_epoch, "target/epochs_run": trainer.current_epoch}
    if is_global_zero():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"backbone": backbone.state_dict(), "head": head.state_dict(),
                    "target_classes": list(task.classes), "info": info}, tmp)
        tmp.replace(path)
        stage_checkpoint_path(run_dir, "target").unlink(missing_ok=True)  # superseded by target.pt
    return module, info
