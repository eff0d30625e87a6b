"""The method contract: what every fine-tuning method (freeze policy or regularizer) may use and do.

A method is a Lightning callback plus these hooks, all optional:

- **statistics** computed once from the source model and data before the target stage (EWC's
  Fisher, LwF's teacher logits): declare `statistics_inputs` (what they depend on: the source
  model, the source data, the target data) and `statistics_settings()` (your own settings that
  change them), implement `compute_statistics(ctx)` → tensors and `use_statistics(stats, ctx)`.
  The experiment caches them in the stage cache under a key of exactly those inputs + settings,
  for every method alike.
- `attach(ctx)`: the target stage starts (after Lightning moved the model to its device): take
  references and anchors. `ctx` is a `MethodContext`. In a resumed run the weights were restored
  before attach: anchors are either saved with the stage (`state_attributes`, as L2-SP's) or read
  from `ctx.start_weights` (set `uses_start_weights`, as DELTA does).
- `modules(ctx)`: extra modules that train with the target head (LwF's source head); the stage adds
  them to the model, so the optimizer, checkpoints and DDP cover them.
- `loss_term(step)`: a term added to the loss inside `training_step`, from the batch and the
  step's outputs (`Step`), so DDP's gradient all-reduce covers it.
- `add_penalty_grad_()`: the exact gradient of a penalty on the weights, added to `.grad` after
  the all-reduce with fused foreach ops — autograd never sees it (~1% of a step, NOTES §4); and
  `penalty()`, its value, computed on logging steps only.

A new method is one file defining the class (its `__init__` signature is its schema: types and
bounds are checked from the annotations, see config.py) plus one YAML in conf/<group>/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
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

    @property
    def start_weights(self) -> dict[str, torch.Tensor]:
        """The backbone's weights when the target stage starts (taken at first use, which is
        before training: the experiment hands the context over before fit)."""
        if self._start_weights is None:
            self._start_weights = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}
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
    # True: attach reads `ctx.start_weights`; the stage then takes them before fit, so a resumed
    # run (whose weights Lightning restores before attach) sees the stage's start, not its restart.
    uses_start_weights = False

    @property
    def name(self) -> str:
        """The option's name (its file: `regularizers/ewc.py` → "ewc"), as users choose it."""
        return type(self).__module__.rsplit(".", 1)[-1]

    @property
    def needs_source_model(self) -> bool:
        return SOURCE_MODEL in self.statistics_inputs

    # -- statistics, computed once and cached by the experiment ---------------------------------
    def statistics_settings(self) -> dict:
        """Your settings that change `compute_statistics` (part of its cache key)."""
        return {}

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

    def loss_term(self, step: Step) -> torch.Tensor:
        raise NotImplementedError
