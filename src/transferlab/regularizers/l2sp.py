"""L2-SP (Li, Grandvalet & Davoine, ICML 2018).

    Omega(w) = alpha/2 * ||w_S - w0_S||^2 + beta/2 * ||w_head||^2

w_S: the backbone shared with the source; w0_S: its weights when the target stage starts (the
source solution, or the pretrained / random init); w_head: the new target head, pulled to zero.
The paper's code uses alpha=0.1, beta=0.01; TLlib uses 0.01 for both.
"""

import torch

from transferlab.method import MethodContext
from transferlab.regularizers.base import Regularizer, sum_of_squares, with_grads
from transferlab.config import NonNegative


class L2SP(Regularizer):
    state_attributes = ("anchors",)

    def __init__(self, alpha: NonNegative, beta: NonNegative):
        self.alpha, self.beta = alpha, beta

    def attach(self, ctx: MethodContext) -> None:
        # What can train this stage (the freeze policy's setup ran before): the rest never moves,
        # so its penalty is 0, and anchors for it would copy the whole model (LoRA: adapters only).
        self.shared = [p for p in ctx.backbone.parameters() if p.requires_grad]
        self.anchors = [p.detach().clone() for p in self.shared]
        self.head = list(ctx.head.parameters())

    def add_penalty_grad_(self) -> None:
        grads, params, anchors = with_grads(self.shared, self.anchors)
        if grads:
            torch._foreach_add_(grads, torch._foreach_sub(params, anchors), alpha=self.alpha)
        grads, params = with_grads(self.head)
        if grads:
            torch._foreach_add_(grads, params, alpha=self.beta)

    def penalty(self) -> torch.Tensor:
        moving = [(p, a) for p, a in zip(self.shared, self.anchors) if p.requires_grad]
        drift = torch._foreach_sub([p for p, _ in moving], [a for _, a in moving]) if moving else []
        device = (self.shared or self.head)[0].device  # linear probe: no backbone parameter trains
        return (self.alpha / 2 * sum_of_squares(drift, device)
                + self.beta / 2 * sum_of_squares(self.head, device))
