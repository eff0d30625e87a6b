"""Source stage: train backbone + source head on the source task, or load a saved one.

Either way it returns a TaskModule whose backbone is *the* backbone object the target stage
will fine-tune, so the source head can measure forgetting afterwards. Where a finished source
stage is kept and found again (the run dir, the stage cache) is `stage_store.py`'s business.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from transferlab.collectives import is_global_zero
from transferlab.data import TransferData
from transferlab.errors import TransferlabError
from transferlab.files import atomic_write
from transferlab.heads import classification_head
from transferlab.stages.callbacks import KeepBestWeights
from transferlab.stages.module import TaskModule
from transferlab.stages.trainer import fit_stage
from transferlab.tasks import Classification

CHECKPOINT_FORMAT = "transferlab-source-v1"


def source_module(cfg, backbone, head) -> TaskModule:
    return TaskModule(backbone, head, stage="source", task=Classification(head.out_features), lr=cfg.source.lr,
                      weight_decay=cfg.source.weight_decay, optimizer=instantiate(cfg.source.optimizer),
                      scheduler=instantiate(cfg.source.scheduler))


def train_source(cfg, data: TransferData, backbone, run_dir: Path) -> tuple[TaskModule, dict]:
    task = data.source
    module = source_module(cfg, backbone, classification_head(backbone.feature_dim, task.num_classes))
    best = KeepBestWeights("source/val_acc")
    fit_stage(cfg, module, task, stage="source", epochs=cfg.source.epochs, batch_size=cfg.source.batch_size,
              seed=cfg.seed, callbacks=[best], run_dir=run_dir)
    return module, {"source/val_acc": best.best_score, "source/best_epoch": best.best_epoch}


def save_source_checkpoint(path: Path, module: TaskModule, cfg, data: TransferData, info: dict) -> None:
    if not is_global_zero():
        return
    payload = {
        "format": CHECKPOINT_FORMAT,
        "backbone": module.backbone.state_dict(),
        "head": module.head.state_dict(),
        "source_classes": list(data.source.classes),
        "source_domains": list(data.source.domains),
        "dataset": data.source_dataset,
        "backbone_config": OmegaConf.to_container(cfg.backbone, resolve=True),
        "info": info,  # the source stage's validation metrics, for a resumed run
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_source_checkpoint(cfg, data: TransferData, backbone) -> tuple[TaskModule, dict]:
    """source=checkpoint: the source stage saved by an earlier run, at source.path."""
    where = f"source.path={cfg.source.path}"
    if not cfg.source.path:
        raise TransferlabError("source=checkpoint needs source.path=<checkpoints/source.pt of a source=train run>")
    path = Path(cfg.source.path)
    if not path.is_file():
        raise TransferlabError(f"{where}: file not found; point it at checkpoints/source.pt of a source=train run")
    return load_source_file(path, where, cfg, data, backbone)[0], {}


def load_source_file(path: Path, where: str, cfg, data: TransferData, backbone) -> tuple[TaskModule, dict]:
    """Load backbone + source head from `path`, with the source stage's metrics saved beside them
    (none in checkpoints from before they were saved); `where` names it in error messages."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  torch raises many types for a damaged file
        raise TransferlabError(f"{where}: cannot be read ({type(e).__name__}); the file is corrupt or "
                               "not a transferlab checkpoint: re-run the source stage") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise TransferlabError(f"{where}: not a transferlab source checkpoint ({CHECKPOINT_FORMAT})")
    saved_domains = list(payload.get("source_domains", []))
    if (list(payload["source_classes"]) != list(data.source.classes) or payload["dataset"] != data.source_dataset
            or saved_domains != list(data.source.domains)):
        raise TransferlabError(
            f"{where}: saved for {payload['dataset']} classes {payload['source_classes']} domains {saved_domains}, "
            f"but this run's source task is {data.source_dataset} classes {data.source.classes} domains "
            f"{data.source.domains}; set data.source_dataset / source_classes / source_domains to match"
        )
    head = classification_head(backbone.feature_dim, data.source.num_classes)
    # Check every shape before touching the shared backbone: a half-loaded backbone would
    # silently change what a retrained source stage starts from.
    for module, state in ((backbone, payload["backbone"]), (head, payload["head"])):
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if expected != found:
            mismatch = sorted(set(expected.items()) ^ set(found.items()))[0]
            raise TransferlabError(f"{where}: its weights do not fit backbone {cfg.backbone._target_} "
                                   f"(first mismatch: {mismatch[0]} {mismatch[1]}); it was saved with backbone "
                                   f"{payload['backbone_config']}")
    backbone.load_state_dict(payload["backbone"])
    head.load_state_dict(payload["head"])
    return source_module(cfg, backbone, head), payload.get("info", {})
