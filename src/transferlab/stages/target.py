"""Target stage: a new head on the same backbone, trained under a freeze policy and a
regularizer; the best epoch on target *validation* is kept (the test split is not looked at)."""

from __future__ import annotations

from pathlib import Path

import torch
from pytorch_lightning.callbacks import EarlyStopping

from transferlab.data import TransferData
from transferlab.data.loaders import make_loader
from transferlab.freeze import FreezePolicy
from transferlab.heads import classification_head
from transferlab.regularizers import Regularizer
from transferlab.stages.callbacks import KeepBestWeights
from transferlab.stages.module import TaskModule
from transferlab.stages.trainer import finish_loggers, make_loggers, make_trainer


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
    monitor = selection_metric(task)
    best = KeepBestWeights(monitor)
    # No-op policies stay out: Lightning calls every hook of every callback on every step.
    callbacks = [c for c in (freeze, regularizer) if c.active] + [best]
    if cfg.target.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor, mode="max", patience=cfg.target.early_stopping_patience))
    pin = cfg.trainer.pin_memory
    train = make_loader(task.train, cfg.target.batch_size, shuffle=True, seed=cfg.seed + 1, pin_memory=pin)
    val = make_loader(task.val, 256, shuffle=False, pin_memory=pin)
    loggers = make_loggers(cfg, run_dir, "target") if loggers is None else loggers
    trainer = make_trainer(cfg, epochs=cfg.target.epochs, loggers=loggers, callbacks=callbacks, run_dir=run_dir)
    try:
        trainer.fit(module, train, val)
    except BaseException:
        finish_loggers(loggers, exit_code=1)
        raise
    finish_loggers(loggers, exit_code=0)
    path = run_dir / "checkpoints" / "target.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"backbone": backbone.state_dict(), "head": head.state_dict(),
                "target_classes": list(task.classes)}, path)
    return module, {monitor: best.best_score, "target/best_epoch": best.best_epoch,
                    "target/epochs_run": trainer.current_epoch}
