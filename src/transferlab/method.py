"""The method contract: what every fine-tuning method (freeze policy or regularizer) may use and do.

A method is a Lightning callback plus these hooks, all optional:

- **statistics** computed once from the source model and data before the target stage (EWC's
  Fisher, LwF's teacher logits): declare `statistics_inputs` (what they depend on: the source
  model, the source data, the target data), implement `compute_statistics(ctx)` → tensors and
  `use_statistics(stats, ctx)`. The experiment caches them in the stage cache under a key of
  those inputs + `statistics_settings()`: every `__init__` argument as resolved (defaults
  included), so a setting nobody thought of still keeps entries apart. A method may only
  *exclude* arguments that cannot change the statistics (`statistics_excluded`, e.g. LwF's
  coefficient); it cannot override `statistics_settings`.
- `attach(ctx)`: the target stage starts (after Lightning moved the model to its device): take
  references and anchors. `ctx` is a `MethodContext`. In a resumed run the weights were restored
  before attach: anchors are either saved with the stage (`state_attributes`, as L2-SP's) or read
  from `ctx.start_weights` (set `uses_start_weights`, as DELTA does: the stage then takes them,
  `ctx.take_start_weights()`, before fit; reading them untaken is an error).
- `modules(ctx)`: extra modules that train with the target head (LwF's source head); the stage adds
  them to the model, so the optimizer, checkpoints and DDP cover them.
- `loss_term(step)`: a term added to the loss inside `training_step`, from the batch and the
  step's outputs (`Step`), so DDP's gradient all-reduce covers it.
- `add_penalty_grad_()`: the exact gradient of a penalty on the weights, added to `.grad` after
  the all-reduce with fused foreach ops — autograd never sees it (~1% of a step, NOTES §4); and
  `penalty()`, its value, computed on logging steps only.

A method is named by its config key (`name`): its option's name for `freeze` and `regularizer`
(the file's: `regularizers/ewc.py` → "ewc"), the key under `extra_regularizers` for the others
(`+regularizer@extra_regularizers.bss2=bss` → "bss2"), so two instances of one class keep their
loss terms, penalties and statistics apart.

A new method is one file defining the class (its `__init__` signature is its schema: types and
bounds are checked from the annotations, see config.py) plus one YAML in conf/<group>/.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

# What a method's statistics may depend on (the cache key then holds exactly these).
SOURCE_MODEL, SOURCE_DATA, TARGET_DATA = "source_model", "source_data", "target_data"


@dataclass
class MethodContext:
    """Everything a method may need when the target stage starts. Loaders are built on demand
    and give evaluation-size batches in order."""

    backbone: nn.Module
    head: Optional[nn.Module] = None  # the new target head (set when the target stage builds it)
    task: Any = None  # tasks.Task: the target task's loss and metrics
    source_model: Optional[nn.Module] = None  # backbone + kept source head; None: scratch / pretrained
    source_head: Optional[nn.Module] = None
    source_task: Any = None
    source_loader: Optional[Callable[[], Any]] = None
    # The target *training* split, whole and in order on every rank (positions = the `index` of a
    # training batch); source_loader: the source training split, this rank's share under DDP.
    target_loader: Optional[Callable[[], Any]] = None
    seed: int = 0
    _start_weights: Optional[dict[str, torch.Tensor]] = field(default=None, repr=False)

    def take_start_weights(self) -> dict[str, torch.Tensor]:
        """Snapshot the backbone's weights now, as the target stage's start; a later call keeps the
        first snapshot. Called before fit (which, in a resumed run, restores the moved weights):
        by the experiment when WiSE-FT or the diagnostics will compare with the start, by the
        target stage when a method declares `uses_start_weights`."""
        if self._start_weights is None:
            self._start_weights = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}
        return self._start_weights

    @property
    def start_weights(self) -> dict[str, torch.Tensor]:
        """The backbone's weights when the target stage started (`take_start_weights`)."""
        if self._start_weights is None:
            raise RuntimeError("MethodContext.start_weights read before take_start_weights(): a method that reads "
                               "them declares `uses_start_weights`, so the stage takes them before fit")
        return self._start_weights

    @property
    def source_weights(self) -> Optional[dict[str, torch.Tensor]]:
        """The weights the source stage left (None without one). The target stage starts from
        them, so they are the start weights (adapters, injected at B = 0, included)."""
        return self.start_weights if self.source_model is not None else None


@dataclass
class Step:
    """One training step's inputs and outputs, as a loss term sees them."""

    x: Any
    y: torch.Tensor
    index: Optional[torch.Tensor]  # positions of the batch's examples in the training split
    features: torch.Tensor  # the backbone's output ((N, d), or (N, L, d) at token level)
    logits: torch.Tensor  # the target head's
    module: nn.Module  # the TaskModule (its method_modules hold what modules() returned)
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)  # what reads_blocks asked for


def plain(value):
    """An argument as plain Python (OmegaConf containers from Hydra become lists and dicts)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def log_to_loggers(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Per-step metrics straight to the loggers. `self.log` costs ~0.4-1 ms a call on CPU (its
    result-collection bookkeeping), a fifth of a small model's step; per-epoch metrics that
    callbacks read (val_acc for selection, early stopping) still go through `self.log`."""
    metrics = {**metrics, "epoch": trainer.current_epoch}  # as self.log adds it: the CSV row's epoch
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


class Method(pl.Callback):
    """The common part of freeze policies and regularizers (see the module docstring)."""

    active = True  # False: adds nothing, so the stage leaves it out of the callbacks
    statistics_inputs: tuple[str, ...] = ()  # empty: no statistics
    has_loss_term = False
    # True: the loss term reads the batch's raw inputs (a start copy runs on them), so the stage
    # cannot train on cached frozen-block outputs instead
    reads_raw_inputs = False
    # True: attach reads `ctx.start_weights`; the stage then takes them before fit, so a resumed
    # run (whose weights Lightning restores before attach) sees the stage's start, not its restart.
    uses_start_weights = False
    # `__init__` arguments that cannot change the statistics: left out of their cache key
    statistics_excluded: tuple[str, ...] = ()
    # False: reads a classifier's logits or pooled features, so a language-modeling target refuses it
    supports_language_modeling = True
    _name: Optional[str] = None  # set for a method under extra_regularizers: its key there
    _settings: Optional[dict] = None  # the resolved `__init__` arguments (see __new__)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "statistics_settings" in cls.__dict__:
            raise TypeError(f"{cls.__qualname__}: a method's statistics are keyed by all its settings; "
                            "list the arguments that cannot change them in `statistics_excluded` instead "
                            "of overriding statistics_settings")

    def __new__(cls, *args, **kwargs):
        """Records the resolved `__init__` arguments (defaults filled in): the method's settings,
        whatever its `__init__` does with them."""
        self = super().__new__(cls)
        if cls.__init__ is object.__init__:  # no __init__ of its own: no settings
            self._settings = {}
            return self
        try:
            bound = inspect.signature(cls.__init__).bind(self, *args, **kwargs)
        except TypeError:  # copy / unpickle (no arguments): __dict__, with _settings, is restored after
            return self
        bound.apply_defaults()
        settings = {}
        for name, parameter in list(inspect.signature(cls.__init__).parameters.items())[1:]:
            value = bound.arguments.get(name)
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                settings.update(value or {})
            elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                settings[name] = list(value or ())
            else:
                settings[name] = value
        self._settings = {k: plain(v) for k, v in settings.items()}
        return self

    @property
    def name(self) -> str:
        """The method's config key: for an extra regularizer its key under `extra_regularizers`
        (set by the experiment), else the option's name (its file: `regularizers/ewc.py` → "ewc")."""
        return self._name or type(self).__module__.rsplit(".", 1)[-1]

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    @property
    def settings(self) -> dict:
        """The resolved `__init__` arguments."""
        return dict(self._settings or {})

    @property
    def needs_source_model(self) -> bool:
        return SOURCE_MODEL in self.statistics_inputs

    # -- statistics, computed once and cached by the experiment ---------------------------------
    def statistics_settings(self) -> dict:
        """Part of the statistics' cache key: every `__init__` argument but `statistics_excluded`."""
        unknown = set(self.statistics_excluded) - set(self.settings)
        if unknown:
            raise TypeError(f"{type(self).__qualname__}.statistics_excluded names no argument: {sorted(unknown)}")
        return {k: v for k, v in self.settings.items() if k not in self.statistics_excluded}

    def compute_statistics(self, ctx: MethodContext) -> dict[str, torch.Tensor]:
        return {}

    def use_statistics(self, stats: dict[str, torch.Tensor], ctx: MethodContext) -> None:
        """Take the statistics (fresh, or loaded from the cache on the CPU). Raise ValueError when
        they do not fit this model: the cache then recomputes them."""

    def report(self) -> dict[str, float]:
        """Numbers about the statistics for results.json, as `<name>/<key>` (DELTA's attention
        spread): what a user checks to see the method did something."""
        return {}

    # -- the target stage ---------------------------------------------------------------------
    def attach(self, ctx: MethodContext) -> None:
        """The target stage starts: take references and anchors."""

    def modules(self, ctx: MethodContext) -> dict[str, nn.Module]:
        return {}

    def reads_blocks(self, backbone) -> list[int]:
        """The backbone blocks whose outputs the loss term reads (`Step.blocks`): the training
        step then runs `backbone.forward_intermediates` instead of its forward."""
        return []

    def loss_term(self, step: Step) -> torch.Tensor:
        raise NotImplementedError
