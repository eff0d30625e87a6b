"""LwF, Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017).

Before the target stage, the kept source head's logits z_o on every target training input are
recorded once (eval mode: dropout off), at the weights the target stage starts from. The source
head then keeps training alongside the new target head, and the loss gains

    lam · T² · KL(softmax(z_o / T) ‖ softmax(ẑ_o / T))      (mean over the batch)

with ẑ_o the source head's logits on the same inputs now. T² keeps the gradient's scale
independent of the temperature (Hinton et al.'s distillation convention); the paper uses T = 2,
lam = 1. Forgetting is then measured with the source head LwF trained (not the head as the source
stage left it): how much of the source task the *whole model* still does.

Shows the method contract end to end: statistics from the source model on the *target* data
(cached), a module that trains with the target head, and a loss term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.config import NonNegative, Positive
from transferlab.errors import ConfigError
from transferlab.method import SOURCE_MODEL, TARGET_DATA, MethodContext, Step
from transferlab.regularizers.base import Regularizer
from transferlab.tasks import outputs


class LwF(Regularizer):
    supports_language_modeling = False  # distills the source head's class probabilities
    statistics_inputs = (SOURCE_MODEL, TARGET_DATA)
    has_loss_term = True
    has_penalty = False
    statistics_excluded = ("lam", "temperature")  # the teacher's raw logits are the statistics

    def __init__(self, lam: NonNegative = 1.0, temperature: Positive = 2.0):
        self.lam, self.temperature = lam, temperature
        self.teacher: torch.Tensor | None = None  # (target train examples, source classes)

    @torch.no_grad()
    def compute_statistics(self, ctx: MethodContext) -> dict[str, torch.Tensor]:
        if ctx.task is not None and ctx.task.token_level:
            raise ConfigError("regularizer=lwf: the target task is token classification (NER), whose "
                              "per-token features the sequence source head cannot read; use l2sp or ewc")
        return {"teacher_logits": outputs(ctx.source_model, ctx.target_loader())[0]}

    def use_statistics(self, stats: dict[str, torch.Tensor], ctx: MethodContext) -> None:
        teacher = stats["teacher_logits"]
        expected = ctx.source_head.out_features
        if teacher.ndim != 2 or teacher.shape[1] != expected:
            raise ValueError(f"LwF: teacher logits of shape {tuple(teacher.shape)}, expected (n, {expected})")
        self.teacher = teacher

    def modules(self, ctx: MethodContext) -> dict[str, nn.Module]:
        return {"source_head": ctx.source_head}

    def attach(self, ctx: MethodContext) -> None:
        if self.teacher is None:
            raise ConfigError("regularizer=lwf needs a source stage (its kept head is the teacher): "
                              "use source=train or source=checkpoint")

    def loss_term(self, step: Step) -> torch.Tensor:
        if self.teacher.device != step.logits.device:
            self.teacher = self.teacher.to(step.logits.device)
        t = self.temperature
        student = step.module.method_modules["source_head"](step.features) / t
        teacher = self.teacher[step.index] / t
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
        return self.lam * t * t * kl
