"""Source stage: train backbone + source head on the source task, or load a saved one.

Either way it returns a TaskModule whose backbone is *the* backbone object the target stage
will fine-tune, so the source head can measure forgetting afterwards.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from transferlab.data import TransferData
from transferlab.data.loaders import make_loader
from transferlab.errors import TransferlabError
from transferlab.heads import classification_head
from transferlab.stages.callbacks import KeepBestWeights
from transferlab.stages.module import TaskModule
from transferlab.stages.trainer import finish_loggers, make_loggers, make_trainer

CHECKPOINT_FORMAT = "transferlab-source-v1"


def train_source(cfg, data: TransferData, backbone, run_dir: Path) -> tuple[TaskModule, dict]:
    task = data.source
    head = classification_head(backbone.feature_dim, task.num_classes)
    module = TaskModule(backbone, head, task="source", lr=cfg.source.lr, weight_decay=cfg.source.weight_decay)
    best = KeepBestWeights("source/val_acc")
    loggers = make_loggers(cfg, run_dir, "source")
    trainer = make_trainer(cfg, epochs=cfg.source.epochs, loggers=loggers, callbacks=[best], run_dir=run_dir)
    try:
        trainer.fit(module, make_loader(task.train, cfg.source.batch_size, shuffle=True, seed=cfg.seed),
                    make_loader(task.val, 256, shuffle=False))
    except BaseException:
        finish_loggers(loggers, exit_code=1)
        raise
    finish_loggers(loggers, exit_code=0)
    save_source_checkpoint(run_dir / "checkpoints" / "source.pt", module, cfg, data)
    return module, {"source/val_acc": best.best_score, "source/best_epoch": best.best_epoch}


def save_source_checkpoint(path: Path, module: TaskModule, cfg, data: TransferData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "backbone": module.backbone.state_dict(),
        "head": module.head.state_dict(),
        "source_classes": list(data.source.classes),
        "dataset": data.dataset,
        "backbone_config": OmegaConf.to_container(cfg.backbone, resolve=True),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a reader never sees half a checkpoint


def load_source_checkpoint(cfg, data: TransferData, backbone) -> tuple[TaskModule, dict]:
    where = f"source.path={cfg.source.path}"
    if not cfg.source.path:
        raise TransferlabError("source=checkpoint needs source.path=<checkpoints/source.pt of a source=train run>")
    path = Path(cfg.source.path)
    if not path.is_file():
        raise TransferlabError(f"{where}: file not found; point it at checkpoints/source.pt of a source=train run")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  torch raises many types for a damaged file
        raise TransferlabError(f"{where}: cannot be read ({type(e).__name__}); the file is corrupt or "
                               "not a transferlab checkpoint: re-run the source stage") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise TransferlabError(f"{where}: not a transferlab source checkpoint ({CHECKPOINT_FORMAT})")
    if list(payload["source_classes"]) != list(data.source.classes) or payload["dataset"] != data.dataset:
        raise TransferlabError(
            f"{where}: saved for {payload['dataset']} classes {payload['source_classes']}, but this run's "
            f"source task is {data.dataset} classes {data.source.classes}; set data.source_classes to match"
        )
    head = classification_head(backbone.feature_dim, data.source.num_classes)
    try:
        backbone.load_state_dict(payload["backbone"])
        head.load_state_dict(payload["head"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise TransferlabError(f"{where}: its weights do not fit backbone {cfg.backbone._target_} ({first}); "
                               f"it was saved with backbone {payload['backbone_config']}") from e
    module = TaskModule(backbone, head, task="source", lr=cfg.source.lr)
    return module, {}
