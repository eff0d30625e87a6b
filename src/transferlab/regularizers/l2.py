"""L2 toward zero (weight decay as a penalty): alpha/2 * sum ||w||^2 over everything that trains."""

import torch

from transferlab.method import MethodContext
from transferlab.regularizers.base import Regularizer, sum_of_squares, with_grads
from transferlab.config import NonNegative


class L2(Regularizer):
    def __init__(self, alpha: NonNegative):
        self.alpha = alpha

    def attach(self, ctx: MethodContext) -> None:
        self.params = [*ctx.backbone.parameters(), *ctx.head.parameters()]

    def add_penalty_grad_(self) -> None:
        grads, params = with_grads(self.params)
        if grads:
            torch._foreach_add_(grads, params, alpha=self.alpha)

    def penalty(self) -> torch.Tensor:
        trainable = [p for p in self.params if p.requires_grad]
        return self.alpha / 2 * sum_of_squares(trainable, device=self.params[0].device)
