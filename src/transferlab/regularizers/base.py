"""The regularizer interface: a `Method` (method.py) that changes the target stage's objective,
as a gradient added to the weights (`add_penalty_grad_`) and/or a loss term."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from transferlab.method import Method, log_to_loggers

Tensors = list[torch.Tensor]


class Regularizer(Method):
    """Subclasses implement `attach(ctx)` and either `add_penalty_grad_` + `penalty` (a
    penalty on the weights) or `loss_term` (with `has_loss_term = True`)."""

    has_penalty = True  # False: a loss-term-only method (no gradient to add, no penalty to log)
    # Attributes (lists of tensors, one per parameter) that define the penalty: the stage
    # checkpoint saves them, and a resumed run takes them back instead of re-taking anchors
    # from weights that have moved since the target stage started.
    state_attributes: tuple[str, ...] = ()
    _restored: dict | None = None

    @property
    def penalty_key(self) -> str:
        """Logged as <stage>/<penalty_key>: "penalty" for `regularizer`, "<key>_penalty" for the
        one at extra_regularizers.<key> (its `name`)."""
        return "penalty" if self._name is None else f"{self._name}_penalty"

    def add_penalty_grad_(self) -> None:
        """Add d(penalty)/dw to w.grad for every parameter that has a gradient this step."""

    def penalty(self) -> torch.Tensor:
        return torch.zeros(())

    # -- Lightning hooks -----------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.attach(pl_module.context)
        if self._restored is not None:  # resuming: Lightning restored this before on_fit_start
            device = next(pl_module.parameters()).device
            for name, tensors in self._restored.items():
                setattr(self, name, [t.to(device) for t in tensors])
            self._restored = None

    @property
    def state_key(self) -> str:  # two regularizers of one run keep their checkpoint states apart
        return f"{type(self).__qualname__}[{self.penalty_key}]"

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.state_attributes}

    def load_state_dict(self, state: dict) -> None:
        self._restored = state

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module, optimizer) -> None:
        if self.has_penalty:
            self.add_penalty_grad_()

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the step that just ran
        if self.has_penalty and trainer.loggers and step % trainer.log_every_n_steps == 0:
            log_to_loggers(trainer, {f"{pl_module.stage}/{self.penalty_key}": float(self.penalty())}, step)


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
