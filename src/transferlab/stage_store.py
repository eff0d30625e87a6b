"""Where a stage's result is kept and found again — one place for every stage:

- the run dir (`checkpoints/source.pt`; the target stage keeps `target.pt` itself, stages/target.py):
  a resumed run takes finished stages back;
- the stage cache (`cache.py`): every job of a sweep with the same key reuses the source stage,
  the methods' statistics (EWC's Fisher, LwF's teacher logits) and the outputs of blocks frozen
  for a whole target stage (a linear probe's features) instead of recomputing them;
- a user's file (`source=checkpoint source.path=...`).

Cache keys hold exactly what determines a result: `source_settings` (never target settings) for
the source stage; for a method's statistics, the method's class and `statistics_settings()`
plus the settings of the inputs it declares (`Method.statistics_inputs`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from transferlab.cache import StageCache
from transferlab.collectives import is_global_zero
from transferlab.config import DEFAULT_OPTIMIZER, DEFAULT_SCHEDULER
from transferlab.data import TransferData
from transferlab.method import SOURCE_DATA, SOURCE_MODEL, TARGET_DATA, Method, MethodContext
from transferlab.stages.checkpointing import stage_checkpoint_path
from transferlab.stages.module import TaskModule
from transferlab.stages.source import load_source_file, save_source_checkpoint, train_source


def recipe_settings(stage_cfg) -> dict:
    """The stage's optimizer and schedule, when they are not the default recipe."""
    optimizer = OmegaConf.to_container(stage_cfg.optimizer, resolve=True)
    scheduler = OmegaConf.to_container(stage_cfg.scheduler, resolve=True)
    if optimizer == DEFAULT_OPTIMIZER and scheduler == DEFAULT_SCHEDULER:
        return {}
    return {"optimizer": optimizer, "scheduler": scheduler}


def source_settings(cfg, data: TransferData) -> dict:
    """Exactly what determines the source stage's result: its cache key. No target settings."""
    d = cfg.data
    settings = {
        "stage": "source",
        # the pool the source task is cut from (data.source_dataset when set): keys of runs
        # without one are unchanged
        "dataset": OmegaConf.to_container(d.dataset if d.source_dataset is None else d.source_dataset, resolve=True),
        "source_classes": list(d.source_classes) if d.source_classes is not None else list(data.source.classes),
        "val_fraction": d.val_fraction,
        "test_fraction": d.test_fraction,
        "source_train_size": d.source_train_size,
        "split_seed": cfg.seed if d.split_seed is None else d.split_seed,
        # gradient checkpointing recomputes activations: the same numbers, so not part of the key
        "backbone": {k: v for k, v in OmegaConf.to_container(cfg.backbone, resolve=True).items()
                     if k != "gradient_checkpointing"},
        "source": {k: cfg.source[k] for k in ("epochs", "lr", "weight_decay", "batch_size")},
        "seed": cfg.seed,
        "trainer": {k: cfg.trainer[k] for k in ("precision", "deterministic", "gradient_clip_val")},
    }
    settings["source"].update(recipe_settings(cfg.source))
    if data.is_text or d.source_domains:  # only then: earlier cache keys stay valid
        settings.update(source_domains=list(d.source_domains), max_length=d.max_length)
    if getattr(data, "source_fingerprint", None) is not None:  # data=hf: its content, so an edited file is a miss
        settings["content"] = data.source_fingerprint
    if d.augment:
        settings["augment"] = True
    return settings


def target_data_settings(cfg, data: TransferData) -> dict:
    """What determines the target split's examples and their order (and, with the backbone in
    the source settings, their tokens)."""
    d = cfg.data
    classes = list(d.target_classes) if d.target_classes is not None else list(data.target.classes)
    return {"dataset": OmegaConf.to_container(d.dataset, resolve=True), "target_classes": classes,
            "target_domains": list(d.target_domains), "val_fraction": d.val_fraction,
            "test_fraction": d.test_fraction, "target_train_size": d.target_train_size,
            "split_seed": cfg.seed if d.split_seed is None else d.split_seed,
            "max_length": d.max_length if data.is_text else None,
            **({"content": data.fingerprint} if data.fingerprint is not None else {})}


# -- the source stage -----------------------------------------------------------------------------
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


# -- a method's statistics, for every method alike ----------------------------------------------
def method_statistics(cfg, data: TransferData, method: Method, ctx: MethodContext, cache: StageCache | None,
                      adapters: dict | None = None) -> bool | None:
    """Compute (or load) `method`'s statistics and hand them to it; returns the cache hit
    (None: not cached). `adapters`: what the freeze policy injected before them (LoRA)."""
    if cache is None:
        method.use_statistics(method.compute_statistics(ctx), ctx)
        return None
    inputs = set(method.statistics_inputs)
    settings = {"method": type(method).__name__, **method.statistics_settings()}
    if inputs & {SOURCE_MODEL, SOURCE_DATA}:
        settings["source"] = source_settings(cfg, data)
    if TARGET_DATA in inputs:
        settings["target_data"] = target_data_settings(cfg, data)
    if adapters:  # only then: earlier cache keys stay valid
        settings["adapters"] = adapters

    return cache.fetch_tensors("method_statistics", settings, lambda: method.compute_statistics(ctx),
                               lambda stats: method.use_statistics(stats, ctx))[1]
