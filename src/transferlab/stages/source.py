"""Source stage: train backbone + source head on the source task, or load a saved one.

Either way it returns a TaskModule whose backbone is *the* backbone object the target stage
will fine-tune, so the source head can measure forgetting afterwards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from transferlab.cache import StageCache

from transferlab.data import TransferData
from transferlab.distributed import is_global_zero
from transferlab.errors import TransferlabError
from transferlab.heads import classification_head
from transferlab.stages.callbacks import KeepBestWeights
from transferlab.stages.module import TaskModule
from transferlab.stages.checkpointing import stage_checkpoint_path
from transferlab.stages.trainer import fit_stage

CHECKPOINT_FORMAT = "transferlab-source-v1"


def train_source(cfg, data: TransferData, backbone, run_dir: Path) -> tuple[TaskModule, dict]:
    task = data.source
    head = classification_head(backbone.feature_dim, task.num_classes)
    module = TaskModule(backbone, head, task="source", lr=cfg.source.lr, weight_decay=cfg.source.weight_decay)
    best = KeepBestWeights("source/val_acc")
    fit_stage(cfg, module, task, stage="source", epochs=cfg.source.epochs, batch_size=cfg.source.batch_size,
              seed=cfg.seed, callbacks=[best], run_dir=run_dir)
    return module, {"source/val_acc": best.best_score, "source/best_epoch": best.best_epoch}


def source_settings(cfg, data: TransferData) -> dict:
    """Exactly what determines the source stage's result: its cache key. No target settings."""
    d = cfg.data
    settings = {
        "stage": "source",
        # the pool the source task is cut from (data.source_dataset when set): keys of runs
        # without one are unchanged
        "dataset": OmegaConf.to_container(d.dataset if d.source_dataset is None else d.source_dataset, resolve=True),
        "source_classes": list(d.source_classes),
        "val_fraction": d.val_fraction,
        "test_fraction": d.test_fraction,
        "source_train_size": d.source_train_size,
        "split_seed": cfg.seed if d.split_seed is None else d.split_seed,
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        "source": {k: cfg.source[k] for k in ("epochs", "lr", "weight_decay", "batch_size")},
        "seed": cfg.seed,
        "trainer": {k: cfg.trainer[k] for k in ("precision", "deterministic", "gradient_clip_val")},
    }
    if data.is_text or d.source_domains:  # only then: earlier cache keys stay valid
        settings.update(source_domains=list(d.source_domains), max_length=d.max_length)
    return settings


def obtain_source(cfg, data: TransferData, backbone, run_dir: Path, cache: StageCache | None
                  ) -> tuple[TaskModule, dict]:
    """Train the source stage, or take it from the cache; either way the run dir gets its copy.
    A resumed run whose source stage had finished takes that copy back."""
    run_checkpoint = run_dir / "checkpoints" / "source.pt"
    if run_checkpoint.is_file():
        module, info = load_source_file(run_checkpoint, str(run_checkpoint), cfg, data, backbone)
        return module, {**info, "cache/source_hit": None}
    if cache is None:
        module, info = train_source(cfg, data, backbone, run_dir)
        save_source_checkpoint(run_checkpoint, module, cfg, data, info)
        stage_checkpoint_path(run_dir, "source").unlink(missing_ok=True)  # superseded by source.pt
        return module, {**info, "cache/source_hit": None}

    def compute(folder: Path) -> None:
        module, info = train_source(cfg, data, backbone, run_dir)
        save_source_checkpoint(folder / "source.pt", module, cfg, data, info)
        (folder / "info.json").write_text(json.dumps(info))

    def load(folder: Path):
        module, _ = load_source_file(folder / "source.pt", f"cache entry {folder}", cfg, data, backbone)
        return module, json.loads((folder / "info.json").read_text()), folder / "source.pt"

    (module, info, cached_file), hit = cache.fetch("source", source_settings(cfg, data), compute, load)
    if is_global_zero():
        run_checkpoint.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached_file, run_checkpoint)
        stage_checkpoint_path(run_dir, "source").unlink(missing_ok=True)  # superseded by source.pt
    return module, {**info, "cache/source_hit": hit}


def save_source_checkpoint(path: Path, module: TaskModule, cfg, data: TransferData, info: dict) -> None:
    if not is_global_zero():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
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
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a reader never sees half a checkpoint


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
    return TaskModule(backbone, head, task="source", lr=cfg.source.lr), payload.get("info", {})
