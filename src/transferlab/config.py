"""Typed config schemas, and the checks types alone cannot express.

- The run's own settings (data, source, target, trainer, logger, paths, cache) are dataclasses
  in Hydra's ConfigStore: a misspelled key or a wrong type fails at compose time, naming the key.
  A key added with `+` (Hydra's own hint for a typo: `+target.epoch=3`) gets past struct mode;
  `check_keys` walks the whole config against the dataclasses and refuses it, naming the closest
  real key.
- A component (a backbone, freeze policy, regularizer, optimizer, schedule, dataset loader) is a
  `_target_` node in a field typed `Any` (or a `Dict[str, Any]` of them: `extra_regularizers`),
  whose schema is its class's `__init__` signature: `check_arguments` checks every key against the
  annotations (types, and bounds such as `NonNegative`) before anything runs. Its defaults live in
  its YAML alone.
- Importing this module imports neither torch nor Lightning: `--help` and `--cfg job` stay fast.

`validate` runs both, plus ranges and cross-field constraints, raising a one-line ConfigError.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from transferlab.errors import ConfigError


# -- bounds for component arguments (annotations on __init__) -----------------------------------
@dataclass(frozen=True)
class Bounds:
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def violated(self, value) -> Optional[str]:
        for op, limit, ok in (("<", self.lt, lambda v, x: v < x), ("<=", self.le, lambda v, x: v <= x),
                              (">", self.gt, lambda v, x: v > x), (">=", self.ge, lambda v, x: v >= x)):
            if limit is not None and not ok(value, limit):
                return f"must be {op} {limit:g}"
        return None


NonNegative = Annotated[float, Bounds(ge=0)]  # a coefficient: 0 turns the term off
Positive = Annotated[float, Bounds(gt=0)]
PositiveInt = Annotated[int, Bounds(gt=0)]
NonNegativeInt = Annotated[int, Bounds(ge=0)]
Probability = Annotated[float, Bounds(ge=0, lt=1)]  # e.g. a dropout rate
Signed = Annotated[float, Bounds()]  # a float that may be negative (regularizers must say so)


@dataclass
class DataConfig:
    dataset: Any = MISSING  # {_target_: a loader returning a LabelledPool, ...its arguments}
    # class ids of the pool (data=hf: a ClassLabel's order, else the sorted distinct labels); null: all
    source_classes: Optional[List[int]] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    target_classes: Optional[List[int]] = field(default_factory=lambda: [5, 6, 7, 8, 9])
    val_fraction: float = 0.15  # of each task's training pool, held out for selection
    test_fraction: float = 0.2  # used only by datasets without an official test split
    source_train_size: Optional[int] = None  # cap on source training examples (None: all)
    target_train_size: Optional[int] = None  # the label budget on the target (None: all)
    test_size: Optional[int] = None  # cap on each task's test split, seeded and stratified (None: all)
    split_seed: Optional[int] = None  # None: follow `seed`, so each seed draws its own split
    # A domain split (text: airline → other tweets): when given, tasks are cut by domain and
    # both keep the classes listed above (which may then be the same). Empty: a class split.
    source_domains: List[str] = field(default_factory=list)
    target_domains: List[str] = field(default_factory=list)
    max_length: int = 128  # text only: tokens kept per example
    # Loading (data=hf images are decoded per batch): DataLoader worker processes for training,
    # validation and test batches (0: in the training process), and a train-time augmentation
    # (random resized crop + horizontal flip; images only).
    num_workers: int = 0
    augment: bool = False
    # Another pool for the source task ({_target_: a loader, ...}, like `dataset`): source_classes,
    # source_domains and source_train_size then apply to it, and the target comes from `dataset`
    # (sentiment → NER). None: both tasks are cut from `dataset`.
    source_dataset: Any = None
    # Generalization: an out-of-distribution test split of the target task, scored as
    # target/ood_test_<metric> — held-out domains of the pool (text: ood_domains: [airline]),
    # at most ood_test_size examples, or the target test split under a label-preserving shift
    # ({_target_: transferlab.data.shifts.gaussian_noise, sigma: 0.3}).
    ood_domains: List[str] = field(default_factory=list)
    ood_test_size: Optional[int] = 2000
    ood_shift: Any = None


class SourceMode(Enum):
    train = "train"  # train backbone + source head on the source task
    scratch = "scratch"  # no source stage: the no-transfer baseline
    checkpoint = "checkpoint"  # load a source stage saved by an earlier run
    pretrained = "pretrained"  # no source stage: the backbone's pretrained weights are the start (and L2-SP's anchor)


# The recipe every run used before optimizers and schedules were config groups: left out of the
# cache keys (stage_store) and matched by recorded configs that lack it (run_dir), so earlier
# entries and runs stay valid.
DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True}
DEFAULT_SCHEDULER = {"_target_": "transferlab.optim.constant", "_partial_": True, "warmup_steps": 0, "warmup_ratio": 0.0}


@dataclass
class SourceConfig:
    mode: SourceMode = SourceMode.train
    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    path: Optional[str] = None  # for mode=checkpoint: a checkpoints/source.pt
    # Hydra partials (conf/optimizer, conf/scheduler): optimizer@source.optimizer=sgd
    optimizer: Any = MISSING
    scheduler: Any = MISSING


@dataclass
class TargetConfig:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    early_stopping_patience: Optional[int] = None  # epochs without val improvement (None: off)
    # Hydra partials (conf/optimizer, conf/scheduler): optimizer=sgd scheduler=cosine
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    # blocks frozen for the whole stage: their output computed once, where exact (stages/frozen_prefix.py)
    cache_frozen_blocks: bool = True


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    precision: str = "32-true"
    deterministic: bool = True
    log_every_n_steps: int = 10
    # auto: a bar on a terminal, else one line per epoch (logs, CI, SLURM); true: the bar; false: neither
    progress_bar: Any = "auto"
    gradient_clip_val: Optional[float] = None
    num_threads: Optional[int] = None  # torch CPU threads (None: torch's default, or shared fairly under joblib)
    strategy: str = "auto"  # auto (one process), ddp (conf/trainer/ddp*.yaml) or fsdp_layers (trainer=fsdp)
    num_nodes: int = 1
    sync_batchnorm: bool = False  # DDP: BatchNorm statistics over the global batch, as in one process
    pin_memory: bool = False  # page-locked host batches, copied to the GPU without blocking
    # Exact resume: a stage checkpoint is written every `checkpoint_interval_s` seconds of training
    # (null: never on time) and, when set, every n optimizer steps; SIGTERM always writes one.
    checkpoint_interval_s: Optional[float] = 300.0
    checkpoint_every_n_steps: Optional[int] = None
    gradient_checkpointing: bool = False  # recompute activations in backward (read by backbone=hf_causal)


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
    # $TRANSFERLAB_CACHE, else the user cache dir: independent of the working directory
    dir: str = "${oc.env:TRANSFERLAB_CACHE,${oc.env:XDG_CACHE_HOME,${oc.env:HOME}/.cache}/transferlab}"
    lock: str = "auto"  # auto | flock | soft (shared filesystems); see cache.py
    stale_lock_s: float = 300.0  # soft lock: broken when its heartbeat has not moved for this long


@dataclass
class LmEvalConfig:
    # lm-evaluation-harness tasks scored before and after the target stage (a language model
    # backbone; pip install -e '.[lmeval]'). Empty: off.
    tasks: List[str] = field(default_factory=list)
    limit: Optional[float] = None  # examples per task (a float < 1: a fraction); null: all
    num_fewshot: Optional[int] = None  # null: each task's own default
    include_path: Optional[str] = None  # a folder of your own task YAMLs (local data_files: offline)
    batch_size: int = 8


@dataclass
class EvaluateConfig:
    # LogME, LEEP, NCE and H-score of the target training set's features at the start of the
    # target stage (one forward pass, no training): does the start point look transferable?
    transferability: bool = True
    # WiSE-FT (Wortsman et al. 2022): after the target stage, the backbone at (1-α)·θ_start + α·θ_tuned
    # for each α, evaluated on target val / test and the source test; α is selected on val.
    # Empty: off. E.g. [0, 0.25, 0.5, 0.75, 1].
    wise_ft_alphas: List[float] = field(default_factory=list)
    # Where fine-tuning moved the backbone (diagnostics.py): per block, ‖θ−θ₀‖/‖θ₀‖, the effective
    # rank of each weight matrix's change, linear CKA of start vs tuned features on target val.
    diagnostics: bool = True
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


@dataclass
class ReportConfig:
    # The setting every other is compared with in the report's paired comparison, as report.md
    # labels it (e.g. "+ablation/regularizer=none"); None: the arm whose swept value is none, else the first.
    baseline: Optional[str] = None


REGULARIZERS = {"coefficients": True}  # field metadata: the components there are regularizers


@dataclass
class Config:
    seed: int = 0
    name: str = "default"  # experiment name: W&B group and output folder
    data: DataConfig = MISSING
    backbone: Any = MISSING
    freeze: Any = MISSING
    # REGULARIZERS: a float or int argument without bounds of its own is a coefficient (>= 0)
    regularizer: Any = field(default=MISSING, metadata=REGULARIZERS)
    # More regularizers on top of `regularizer`, each with its own coefficients, each named by its key
    # (its loss term is logged as target/<key>_loss, its penalty as target/<key>_penalty):
    #   transferlab regularizer=l2sp +regularizer@extra_regularizers.bss=bss extra_regularizers.bss.eta=0.01
    extra_regularizers: Dict[str, Any] = field(default_factory=dict, metadata=REGULARIZERS)
    source: SourceConfig = field(default_factory=SourceConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    force: bool = False  # rerun even if this run dir already holds a completed run of this config
    # What a sweeper (Optuna) maximizes; None: the task's primary validation metric
    # (target/val_acc, or target/val_f1 for NER).
    optimized_metric: Optional[str] = None


def register_schemas() -> None:
    """Put the run's schemas in the ConfigStore (idempotent). Components have none here: their
    schema is their signature (`check_arguments`)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="schema", name="data", node=DataConfig)
    cs.store(group="schema", name="source", node=SourceConfig)
    cs.store(group="schema", name="trainer", node=TrainerConfig)
    cs.store(group="schema", name="logger", node=LoggerConfig)
    cs.store(group="schema", name="cache", node=CacheConfig)


# -- component arguments against their signature ------------------------------------------------
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def check_arguments(node, key: str, *, coefficients: bool = False) -> None:
    """Every key of the `_target_` node `node` (found at `key`) against the target's `__init__`
    (or function) signature: a parameter of that name must exist and the value must fit its
    annotation (type and `Bounds`). `coefficients`: a float or int parameter without bounds of
    its own must be >= 0 — the rule for regularizers, present and future (annotate `Signed` to
    opt out)."""
    from hydra.utils import get_object

    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    try:
        target = get_object(node._target_)
    except Exception as e:  # noqa: BLE001  hydra raises several types for a bad path
        raise ConfigError(f"{key}._target_={node._target_}: cannot be imported ({type(e).__name__}); "
                          "check the option's YAML") from None
    function = target.__init__ if inspect.isclass(target) else target
    # a class without an __init__ of its own (NoRegularizer) takes no settings: object.__init__'s
    # (*args, **kwargs) would let every key through
    parameters = {} if function is object.__init__ else inspect.signature(function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except (NameError, TypeError):  # an annotation that does not resolve: check names only
        hints = {}
    for name in node:
        if name in HYDRA_KEYS:
            continue
        where = f"{key}.{name}"
        if name not in parameters:
            if takes_any:
                continue
            known = [p for p in parameters if p != "self"]
            raise ConfigError(f"{where}: {getattr(target, '__name__', target)} takes no such setting"
                              f"{closest(name, known, key)} ({'it takes ' + ', '.join(known) if known else 'it takes none'})")
        if OmegaConf.is_missing(node, name):
            continue
        if not OmegaConf.is_interpolation(node, name) and isinstance(node[name], DictConfig) and "_target_" in node[name]:
            check_arguments(node[name], where)  # a component inside a component (a pool inside a corpus)
        elif name in hints:
            value = OmegaConf.to_container(node, resolve=True)[name]
            check_value(where, value, hints[name], coefficients=coefficients)


def check_value(where: str, value, hint, *, coefficients: bool = False) -> None:
    bounds = None
    if typing.get_origin(hint) is Annotated:
        hint, *extras = typing.get_args(hint)
        bounds = next((e for e in extras if isinstance(e, Bounds)), None)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return check_value(where, value, options[0] if bounds is None else Annotated[options[0], bounds],
                               coefficients=coefficients)
        return  # a real union: the target checks it
    if hint is Any or hint is inspect.Parameter.empty:
        return
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value}: choose one of {', '.join(map(str, args))}")
        return
    if inspect.isclass(hint) and issubclass(hint, enum.Enum):
        names = [m.name for m in hint]
        if getattr(value, "name", value) not in names:
            raise ConfigError(f"{where}={value}: choose one of {', '.join(names)}")
        return
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value}: must be a list")
        if args:
            for i, item in enumerate(value):
                check_value(f"{where}[{i}]", item, args[0], coefficients=coefficients)
        return
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value}: must be true or false")
        return
    if hint in (int, float):
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or (hint is int and not isinstance(value, int)):
            raise ConfigError(f"{where}={value}: must be {'an integer' if hint is int else 'a number'}")
        if bounds is None and coefficients:
            bounds = Bounds(ge=0)
        problem = bounds.violated(value) if bounds is not None else None
        if problem:
            raise ConfigError(f"{where}={value}: {problem}")
        return
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{where}={value}: must be a string")


def closest(name: str, known, where: str = "") -> str:
    """"; did you mean <where>.<the closest of known>?" or ""."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {where + '.' if where else ''}{match[0]}?" if match else ""


def check_keys(node, schema: type = None, where: str = "") -> None:
    """Every key of `node` against the dataclass `schema` (default: `Config`), recursively: a key
    the schema has no field for is refused, naming the closest field. A field typed `Any` holds a
    free value, or a component (a `_target_` node, checked against its signature); a field typed
    `Dict[str, Any]` holds named components, each of which must be one. Hydra's own `hydra` node
    (present when composed with return_hydra_config) is Hydra's to check."""
    schema = Config if schema is None else schema
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for name in node:
        name = str(name)
        key = f"{where}.{name}" if where else name
        if name not in fields:
            if not where and name == "hydra":
                continue
            raise ConfigError(f"{key}: no such setting" + (closest(name, fields, where) or
                                                           f" ({where or 'the top level'} has {', '.join(fields)})"))
        if OmegaConf.is_missing(node, name) or OmegaConf.is_interpolation(node, name):
            continue  # nothing to walk (an interpolation's target is checked where it is)
        value = node[name]
        coefficients = bool(fields[name].metadata.get("coefficients"))
        hint = hints[name]
        if typing.get_origin(hint) is Union:  # Optional[X]: X
            hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        if dataclasses.is_dataclass(hint) and isinstance(value, DictConfig):
            check_keys(value, hint, key)
        elif typing.get_origin(hint) is dict and isinstance(value, DictConfig):
            for entry in value:
                component = value[entry]
                if not (isinstance(component, DictConfig) and "_target_" in component):
                    raise ConfigError(f"{key}.{entry}: not a component (no _target_); choose one with an option, "
                                      f"e.g. +regularizer@{key}.{entry}=bss")
                check_arguments(component, f"{key}.{entry}", coefficients=coefficients)
        elif isinstance(value, DictConfig):
            check_arguments(value, key, coefficients=coefficients)


def validate(cfg) -> None:
    """Checks that types alone cannot express. Raises ConfigError naming the key."""
    check_keys(cfg)  # every key a schema has, every component's keys its signature's

    def positive(key: str, value) -> None:
        if value is None or not value > 0:
            raise ConfigError(f"{key}={value}: must be > 0")

    # Methods are named by their config key: an extra regularizer's key must not be the name the
    # freeze policy or the regularizer already goes by (their option's, the module of _target_)
    taken = {str(node._target_).rsplit(".", 2)[-2]: group for group, node in
             (("freeze", cfg.freeze), ("regularizer", cfg.regularizer)) if isinstance(node, DictConfig) and "_target_" in node}
    for name in cfg.extra_regularizers:
        if name in taken:
            raise ConfigError(f"extra_regularizers.{name}: {taken[name]}={name} goes by that name already (its loss "
                              f"term and penalty are logged under it): give the extra another key, e.g. "
                              f"+regularizer@extra_regularizers.{name}2=...")

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
    if cfg.trainer.strategy not in ("auto", "ddp", "fsdp_layers"):
        raise ConfigError(f"trainer.strategy={cfg.trainer.strategy}: choose auto (one process), ddp "
                          "(trainer=ddp for GPUs, trainer=ddp_cpu for CPU processes) or fsdp_layers (trainer=fsdp)")
    if cfg.trainer.strategy == "fsdp_layers" and str(cfg.regularizer.get("_target_", "")).endswith(".EWC"):
        raise ConfigError("regularizer=ewc with trainer.strategy=fsdp_layers: its Fisher and anchors are whole "
                          "parameters, FSDP shards them; use trainer=ddp (or regularizer=l2sp)")
    if cfg.trainer.strategy == "fsdp_layers" and cfg.trainer.accelerator not in ("gpu", "cuda"):
        raise ConfigError(f"trainer.strategy=fsdp_layers needs CUDA GPUs (trainer.accelerator="
                          f"{cfg.trainer.accelerator}): use trainer=fsdp on GPUs, or trainer=ddp_cpu on CPUs")
    if cfg.trainer.sync_batchnorm and cfg.trainer.accelerator == "cpu":
        raise ConfigError("trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm has no CPU kernel): "
                          "set it to false for CPU DDP (each rank then normalizes with its own batch statistics)")
    if cfg.trainer.checkpoint_interval_s is not None and cfg.trainer.checkpoint_interval_s < 0:
        raise ConfigError(f"trainer.checkpoint_interval_s={cfg.trainer.checkpoint_interval_s}: must be >= 0 "
                          "(0: every step; null: only every checkpoint_every_n_steps and on SIGTERM)")
    if cfg.trainer.checkpoint_every_n_steps is not None:
        positive("trainer.checkpoint_every_n_steps", cfg.trainer.checkpoint_every_n_steps)
    if str(cfg.trainer.progress_bar).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"trainer.progress_bar={cfg.trainer.progress_bar}: choose auto (a bar on a terminal, "
                          "else a line per epoch), true (the bar) or false (neither)")

    every = [None]  # null: every class of the pool (checked when the pool is cut)
    src = every if cfg.data.source_classes is None else list(cfg.data.source_classes)
    tgt = every if cfg.data.target_classes is None else list(cfg.data.target_classes)
    if tgt is not every and not tgt:
        raise ConfigError("data.target_classes is empty: list at least two target classes (or null: every class)")
    if tgt is not every and len(set(tgt)) < 2:
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
    if uses_source and src is not every and len(set(src)) < 2:
        raise ConfigError(
            f"data.source_classes={src}: needs at least two distinct classes "
            "(or use source=scratch for the no-transfer baseline, source=pretrained for a pretrained backbone)"
        )
    overlap = "every class" if every in (src, tgt) else sorted(set(src) & set(tgt))
    if uses_source and overlap and not domain_split and not separate_source:
        hint = (" (null means every class): list disjoint classes, or use source=pretrained / source=scratch"
                if overlap == "every class" else "")
        raise ConfigError(f"data.source_classes and data.target_classes overlap on {overlap}: "
                          f"a class split must be disjoint{hint}")
    for key in ("val_fraction", "test_fraction"):
        value = cfg.data[key]
        if not 0 < value < 1:
            raise ConfigError(f"data.{key}={value}: must be in (0, 1)")
    for key in ("source_train_size", "target_train_size", "test_size", "ood_test_size"):
        value = cfg.data[key]
        if value is not None and value < 1:
            raise ConfigError(f"data.{key}={value}: must be >= 1 (or null for all)")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers}: must be >= 0 (0: load in the training process)")
    if cfg.data.max_length < 2:
        raise ConfigError(f"data.max_length={cfg.data.max_length}: must be >= 2 (room for the special tokens)")
    for alpha in cfg.evaluate.wise_ft_alphas:
        if not 0 <= alpha <= 1:
            raise ConfigError(f"evaluate.wise_ft_alphas={list(cfg.evaluate.wise_ft_alphas)}: every α must be in [0, 1] "
                              "(0: the start weights, 1: the fine-tuned ones)")
    if cfg.trainer.log_every_n_steps < 1:
        raise ConfigError(f"trainer.log_every_n_steps={cfg.trainer.log_every_n_steps}: must be >= 1")
