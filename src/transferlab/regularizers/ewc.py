"""EWC (Kirkpatrick et al., 2017): lambda/2 * sum_i F_i (w_i - w*_i)^2 over the shared backbone.

w* are the source weights and F the diagonal Fisher there, both taken once after the source
stage (the method statistics, cached), from per-sample gradients (see fisher.py).
"""

from typing import Literal

import torch

from transferlab.config import NonNegative, NonNegativeInt

from transferlab.errors import ConfigError
from transferlab.method import SOURCE_DATA, SOURCE_MODEL, MethodContext
from transferlab.regularizers.base import Regularizer, sum_of_squares, with_grads
from transferlab.regularizers.fisher import diagonal_fisher, normalize_fisher


class EWC(Regularizer):
    statistics_inputs = (SOURCE_MODEL, SOURCE_DATA)
    state_attributes = ("anchors", "fisher")

    @property
    def statistics_excluded(self) -> tuple[str, ...]:
        """lam and normalize act on the raw Fisher, after the cache; the seed draws the labels of
        the true Fisher only (fisher=true), the empirical one draws nothing."""
        return ("lam", "normalize") + (() if self.sample_labels else ("seed",))

    def __init__(self, lam: NonNegative, fisher: bool = False, normalize: Literal["none", "max", "mean"] = "none",
                 seed: NonNegativeInt = 0):
        self.lam, self.sample_labels, self.seed = lam, fisher, seed
        self.normalize = normalize
        self.fisher: list[torch.Tensor] | None = None


    def compute_statistics(self, ctx: MethodContext) -> dict[str, torch.Tensor]:
        """The raw diagonal Fisher of the source loss at the source weights, for each backbone
        parameter that can train, by name: all of them, or under LoRA the adapters alone (the
        base weights never move, so their penalty is 0 and their Fisher would be model-sized)."""
        model, backbone = ctx.source_model, ctx.backbone
        in_model = {id(p): name for name, p in model.named_parameters()}
        shared = {in_model[id(p)]: p for p in backbone.parameters() if p.requires_grad}
        fisher = diagonal_fisher(model, shared, ctx.source_loader(), sample_labels=self.sample_labels, seed=self.seed)
        to_backbone = {in_model[id(p)]: name for name, p in backbone.named_parameters()}
        return {to_backbone[name]: f for name, f in fisher.items()}

    def use_statistics(self, stats, ctx: MethodContext) -> None:
        """`stats` may live anywhere (the cache loads them on the CPU): they are moved to the
        parameters' device and dtype, here and again in `attach` (Lightning moves the backbone
        to the accelerator between the two). The backbone holds the source weights: the anchors."""
        named = {n: p for n, p in ctx.backbone.named_parameters() if p.requires_grad}
        if set(stats) != set(named) or any(stats[n].shape != p.shape for n, p in named.items()):
            raise ValueError("EWC: the Fisher does not match the backbone's trainable parameters")
        fisher = normalize_fisher(stats, self.normalize)
        self.names = list(named)
        self.fisher = [fisher[name].to(p) for name, p in named.items()]
        self.anchors = [p.detach().clone() for p in named.values()]

    def attach(self, ctx: MethodContext) -> None:
        if self.fisher is None:
            raise ConfigError("regularizer=ewc needs a source stage to estimate its Fisher: "
                              "use source=train or source=checkpoint")
        named = dict(ctx.backbone.named_parameters())
        self.shared = [named[name] for name in self.names]
        # No copy when they are there already (.to returns the tensor itself).
        self.fisher = [f.to(p) for f, p in zip(self.fisher, self.shared)]
        self.anchors = [a.to(p) for a, p in zip(self.anchors, self.shared)]
    def add_penalty_grad_(self) -> None:
        grads, params, anchors, fisher = with_grads(self.shared, self.anchors, self.fisher)
        if grads:
            torch._foreach_addcmul_(grads, torch._foreach_sub(params, anchors), fisher, value=self.lam)

    def penalty(self) -> torch.Tensor:
        # sum F (w - w*)^2 = ||sqrt(F) (w - w*)||^2 (F >= 0): fused ops, one float64 reduction.
        moving = [(p, a, f) for p, a, f in zip(self.shared, self.anchors, self.fisher) if p.requires_grad]
        if not moving:
            return torch.zeros((), device=self.shared[0].device)
        params, anchors, fisher = zip(*moving)
        weighted = torch._foreach_sub(params, anchors)
        torch._foreach_mul_(weighted, torch._foreach_sqrt(fisher))
        return self.lam / 2 * sum_of_squares(weighted)
