"""The regularizer interface and the Lightning hooks that apply it."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from transferlab.stages.module import log_to_loggers

Tensors = list[torch.Tensor]


class Regularizer(pl.Callback):
    """Subclasses implement `attach`, `add_penalty_grad_` and `penalty`."""

    needs_source = False  # True: source statistics must be set before the target stage
    active = True  # False: adds nothing, so the stage leaves it out of the callbacks
    # Attributes (lists of tensors, one per parameter) that define the penalty: the stage
    # checkpoint saves them, and a resumed run takes them back instead of re-taking anchors
    # from weights that have moved since the target stage started.
    state_attributes: tuple[str, ...] = ()
    _restored: dict | None = None

    def attach(self, backbone: torch.nn.Module, head: torch.nn.Module) -> None:
        """Called when the target stage starts: take references and anchors."""

    # -- statistics of the source stage (EWC's Fisher), computed once and cacheable ------------
    def source_statistics_settings(self) -> dict:
        """What, beyond the source stage itself, determines `compute_source_statistics`."""
        return {}

    def compute_source_statistics(self, model: torch.nn.Module, loader, backbone: torch.nn.Module
                                  ) -> dict[str, torch.Tensor]:
        """Called at the source weights, after the source stage. Keyed by backbone param name."""
        return {}

    def set_source_statistics(self, stats: dict[str, torch.Tensor], backbone: torch.nn.Module) -> None:
        """Take the statistics (fresh or from the cache); the backbone holds the source weights."""

    def prepare_from_source(self, model: torch.nn.Module, loader, backbone: torch.nn.Module) -> None:
        self.set_source_statistics(self.compute_source_statistics(model, loader, backbone), backbone)

    def add_penalty_grad_(self) -> None:
        """Add d(penalty)/dw to w.grad for every parameter that has a gradient this step."""

    def penalty(self) -> torch.Tensor:
        return torch.zeros(())

    # -- Lightning hooks -----------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.attach(pl_module.backbone, pl_module.head)
        if self._restored is not None:  # resuming: Lightning restored this before on_fit_start
            device = next(pl_module.parameters()).device
            for name, tensors in self._restored.items():
                setattr(self, name, [t.to(device) for t in tensors])
            self._restored = None

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.state_attributes}

    def load_state_dict(self, state: dict) -> None:
        self._restored = state

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module, optimizer) -> None:
        self.add_penalty_grad_()

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the step that just ran
        if trainer.loggers and step % trainer.log_every_n_steps == 0:
            log_to_loggers(trainer, {f"{pl_module.task}/penalty": float(self.penalty())}, step)


def with_grads(params: Tensors, *others: Tensors) -> tuple[Tensors, ...]:
    """Keep the entries whose parameter has a gradient this step (frozen ones have none)."""
    keep = [i for i, p in enumerate(params) if p.grad is not None]
    return ([params[i].grad for i in keep], [params[i] for i in keep],
            *([other[i] for i in keep] for other in others))


def sum_of_squares(tensors: Tensors, device: torch.device | None = None) -> torch.Tensor:
    """Sum of squared entries of `tensors`; 0 on `device` (the parameters' device) when empty."""
    if not tensors:
        return torch.zeros((), device=device)
    # Accumulate in float64: a float32 norm of a transformer's 11.7M-entry embedding matrix is
    # off by ~5e-4 (relative) on CPU. This runs on logging steps only, so the cost does not matter.
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    return torch.stack(norms).square().sum().to(tensors[0].dtype)
