"""Typed config schemas, registered in Hydra's ConfigStore.

Hydra merges each YAML in conf/ onto its schema, so a misspelled key or a wrong type fails at
compose time with the full key in the message. Component options (a backbone, a freeze policy, a
regularizer) keep their schema next to their code and register it under ``schema/<group>``.
`validate` then checks what types cannot: ranges and cross-field constraints.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from transferlab.errors import ConfigError


@dataclass
class DataConfig:
    dataset: Any = MISSING  # {_target_: a loader returning a LabelledPool, ...its arguments}
    source_classes: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    target_classes: List[int] = field(default_factory=lambda: [5, 6, 7, 8, 9])
    val_fraction: float = 0.15  # of each task's training pool, held out for selection
    test_fraction: float = 0.2  # used only by datasets without an official test split
    source_train_size: Optional[int] = None  # cap on source training examples (None: all)
    target_train_size: Optional[int] = None  # the label budget on the target (None: all)
    split_seed: Optional[int] = None  # None: follow `seed`, so each seed draws its own split
    # A domain split (text: airline → other tweets): when given, tasks are cut by domain and
    # both keep the classes listed above (which may then be the same). Empty: a class split.
    source_domains: List[str] = field(default_factory=list)
    target_domains: List[str] = field(default_factory=list)
    max_length: int = 128  # text only: tokens kept per example
    # Another pool for the source task ({_target_: a loader, ...}, like `dataset`): source_classes,
    # source_domains and source_train_size then apply to it, and the target comes from `dataset`
    # (sentiment → NER). None: both tasks are cut from `dataset`.
    source_dataset: Any = None


class SourceMode(Enum):
    train = "train"  # train backbone + source head on the source task
    scratch = "scratch"  # no source stage: the no-transfer baseline
    checkpoint = "checkpoint"  # load a source stage saved by an earlier run
    pretrained = "pretrained"  # no source stage: the backbone's pretrained weights are the start (and L2-SP's anchor)


@dataclass
class SourceConfig:
    mode: SourceMode = SourceMode.train
    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    path: Optional[str] = None  # for mode=checkpoint: a checkpoints/source.pt


@dataclass
class TargetConfig:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    early_stopping_patience: Optional[int] = None  # epochs without val improvement (None: off)
    # blocks frozen for the whole stage: their output computed once, where exact (stages/frozen_prefix.py)
    cache_frozen_blocks: bool = True


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    precision: str = "32-true"
    deterministic: bool = True
    log_every_n_steps: int = 10
    progress_bar: bool = False
    gradient_clip_val: Optional[float] = None
    num_threads: Optional[int] = None  # torch CPU threads (None: torch's default, or shared fairly under joblib)
    strategy: str = "auto"  # Lightning strategy: auto (one process) or ddp (see conf/trainer/ddp*.yaml)
    num_nodes: int = 1
    sync_batchnorm: bool = False  # DDP: BatchNorm statistics over the global batch, as in one process
    pin_memory: bool = False  # page-locked host batches, copied to the GPU without blocking
    # Exact resume: a stage checkpoint is written every `checkpoint_interval_s` seconds of training
    # (null: never on time) and, when set, every n optimizer steps; SIGTERM always writes one.
    checkpoint_interval_s: Optional[float] = 300.0
    checkpoint_every_n_steps: Optional[int] = None


class LoggerBackend(Enum):
    wandb = "wandb"
    csv = "csv"
    none = "none"


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.wandb
    project: str = "transferlab"
    entity: Optional[str] = None
    # offline unless the user says otherwise: WANDB_MODE in the environment wins over this.
    mode: str = "offline"
    group: Optional[str] = None  # None: the experiment name
    tags: List[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    output_root: str = "outputs"
    fashion_mnist: str = "/usr/share/datasets/fashion-mnist"


@dataclass
class CacheConfig:
    enabled: bool = True
    dir: str = "outputs/cache"


@dataclass
class Config:
    seed: int = 0
    name: str = "default"  # experiment name: W&B group and output folder
    data: DataConfig = MISSING
    backbone: Any = MISSING
    freeze: Any = MISSING
    regularizer: Any = MISSING
    source: SourceConfig = field(default_factory=SourceConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    force: bool = False  # rerun even if this run dir already holds a completed run of this config
    optimized_metric: Optional[str] = None  # what a sweeper (Optuna) maximizes, e.g. target/val_acc


COMPONENT_PACKAGES = {
    "backbone": "transferlab.backbones",
    "freeze": "transferlab.freeze",
    "regularizer": "transferlab.regularizers",
}


def register_schemas() -> None:
    """Put every schema in the ConfigStore (idempotent).

    A component module (``backbones/cnn.py``, ``freeze/partial.py``, ...) that defines a dataclass
    named ``Config`` is registered as ``schema/<group>/<module name>``; its YAML starts with
    ``defaults: [/schema/<group>/<module name>@_here_]``. A new component is one file + one YAML.
    """
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="schema", name="data", node=DataConfig)
    cs.store(group="schema", name="source", node=SourceConfig)
    cs.store(group="schema", name="trainer", node=TrainerConfig)
    cs.store(group="schema", name="logger", node=LoggerConfig)
    cs.store(group="schema", name="cache", node=CacheConfig)
    for group, package_name in COMPONENT_PACKAGES.items():
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package_name}.{info.name}")
            schema = getattr(module, "Config", None)
            if schema is not None:
                cs.store(group=f"schema/{group}", name=info.name, node=schema)


def validate(cfg) -> None:
    """Checks that types alone cannot express. Raises ConfigError naming the key."""

    def positive(key: str, value) -> None:
        if value is None or not value > 0:
            raise ConfigError(f"{key}={value}: must be > 0")

    positive("target.lr", cfg.target.lr)
    positive("target.epochs", cfg.target.epochs)
    positive("target.batch_size", cfg.target.batch_size)
    if cfg.source.mode == SourceMode.train or cfg.source.mode == "train":
        positive("source.lr", cfg.source.lr)
        positive("source.epochs", cfg.source.epochs)
        positive("source.batch_size", cfg.source.batch_size)
    for key in ("target.weight_decay", "source.weight_decay"):
        section, name = key.split(".")
        if cfg[section][name] < 0:
            raise ConfigError(f"{key}={cfg[section][name]}: must be >= 0")
    if cfg.target.early_stopping_patience is not None:
        positive("target.early_stopping_patience", cfg.target.early_stopping_patience)
    if cfg.trainer.strategy not in ("auto", "ddp"):
        raise ConfigError(f"trainer.strategy={cfg.trainer.strategy}: choose auto (one process) or ddp "
                          "(trainer=ddp for GPUs, trainer=ddp_cpu for CPU processes)")
    if cfg.trainer.accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={cfg.trainer.accelerator}: no CUDA GPU is visible here; "
                              "use trainer=cpu (or trainer=ddp_cpu)")
    if cfg.trainer.sync_batchnorm and cfg.trainer.accelerator == "cpu":
        raise ConfigError("trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm has no CPU kernel): "
                          "set it to false for CPU DDP (each rank then normalizes with its own batch statistics)")
    if cfg.trainer.checkpoint_interval_s is not None and cfg.trainer.checkpoint_interval_s < 0:
        raise ConfigError(f"trainer.checkpoint_interval_s={cfg.trainer.checkpoint_interval_s}: must be >= 0 "
                          "(0: every step; null: only every checkpoint_every_n_steps and on SIGTERM)")
    if cfg.trainer.checkpoint_every_n_steps is not None:
        positive("trainer.checkpoint_every_n_steps", cfg.trainer.checkpoint_every_n_steps)

    src, tgt = list(cfg.data.source_classes), list(cfg.data.target_classes)
    if not tgt:
        raise ConfigError("data.target_classes is empty: list at least two target classes")
    if len(set(tgt)) < 2:
        raise ConfigError(f"data.target_classes={tgt}: needs at least two distinct classes")
    uses_source = str(getattr(cfg.source.mode, "value", cfg.source.mode)) in ("train", "checkpoint")
    src_domains, tgt_domains = list(cfg.data.source_domains), list(cfg.data.target_domains)
    separate_source = cfg.data.source_dataset is not None  # two pools: class ids and domains are per pool
    domain_split = bool(src_domains or tgt_domains)
    if domain_split and not separate_source:
        # A domain split: the tasks differ in domain, so sharing classes is the point.
        if not tgt_domains:
            raise ConfigError("data.target_domains is empty but data.source_domains is set: list the target domains")
        if uses_source and not src_domains:
            raise ConfigError("data.source_domains is empty but data.target_domains is set: list the source domains "
                              "(or use source=scratch / source=pretrained)")
        overlap = sorted(set(src_domains) & set(tgt_domains))
        if uses_source and overlap:
            raise ConfigError(f"data.source_domains and data.target_domains overlap on {overlap}: "
                              "a domain split must be disjoint")
    if uses_source and len(set(src)) < 2:
        raise ConfigError(
            f"data.source_classes={src}: needs at least two distinct classes "
            "(or use source=scratch for the no-transfer baseline, source=pretrained for a pretrained backbone)"
        )
    overlap = sorted(set(src) & set(tgt))
    if uses_source and overlap and not domain_split and not separate_source:
        raise ConfigError(
            f"data.source_classes and data.target_classes overlap on {overlap}: "
            "a class split must be disjoint"
        )
    for key in ("val_fraction", "test_fraction"):
        value = cfg.data[key]
        if not 0 < value < 1:
            raise ConfigError(f"data.{key}={value}: must be in (0, 1)")
    for key in ("source_train_size", "target_train_size"):
        value = cfg.data[key]
        if value is not None and value < 1:
            raise ConfigError(f"data.{key}={value}: must be >= 1 (or null for all)")
    if cfg.data.max_length < 2:
        raise ConfigError(f"data.max_length={cfg.data.max_length}: must be >= 2 (room for the special tokens)")
    if cfg.trainer.log_every_n_steps < 1:
        raise ConfigError(f"trainer.log_every_n_steps={cfg.trainer.log_every_n_steps}: must be >= 1")
