"""Co-Tuning (You et al., NeurIPS 2020): keep the source head and train it too, toward the
source-category distribution each target label implies.

Before the target stage, the category relationship p(y_s | y_t) is learned from the source head's
predictions on the target training set: for each target class, the mean of softmax(source head)
over its examples (each row a distribution over the source classes; eval mode). The target stage
then minimizes

    CE(target head, y_t) + lam · CE(source head, p(· | y_t))

(soft targets: −Σ_s p(s | y_t) log softmax(ẑ_s)). This is the paper's direct relationship; its
calibrated and reverse variants are not built. TLlib #156: run it *from* the source weights, or
it looks worse than plain fine-tuning — here it needs a source stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.config import NonNegative
from transferlab.errors import ConfigError
from transferlab.method import SOURCE_MODEL, TARGET_DATA, MethodContext, Step
from transferlab.regularizers.base import Regularizer
from transferlab.tasks import outputs


class CoTuning(Regularizer):
    supports_language_modeling = False  # maps target classes to source classes
    statistics_inputs = (SOURCE_MODEL, TARGET_DATA)
    has_loss_term = True
    has_penalty = False
    statistics_excluded = ("lam",)  # the relationship does not depend on the loss's weight

    def __init__(self, lam: NonNegative = 2.3):
        self.lam = lam
        self.relationship: torch.Tensor | None = None  # (target classes, source classes)

    @torch.no_grad()
    def compute_statistics(self, ctx: MethodContext) -> dict[str, torch.Tensor]:
        if ctx.task is not None and ctx.task.token_level:
            raise ConfigError("regularizer=co_tuning: the target task is token classification (NER); the category "
                              "relationship is per example: use a sequence-level task")
        logits, labels = outputs(ctx.source_model, ctx.target_loader())
        probs = torch.softmax(logits.double(), -1)
        num_target = int(ctx.task.num_classes) if ctx.task is not None else int(labels.max()) + 1
        sums = torch.zeros(num_target, probs.shape[1], dtype=torch.float64).index_add_(0, labels, probs)
        counts = torch.bincount(labels, minlength=num_target).double()
        if (counts == 0).any():
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise ConfigError(f"regularizer=co_tuning: target classes {missing} have no training example "
                              "(raise data.target_train_size)")
        return {"relationship": (sums / counts[:, None]).float()}

    def use_statistics(self, stats: dict[str, torch.Tensor], ctx: MethodContext) -> None:
        relationship = stats["relationship"]
        if relationship.ndim != 2 or relationship.shape[1] != ctx.source_head.out_features:
            raise ValueError(f"Co-Tuning: relationship of shape {tuple(relationship.shape)} does not fit the source head")
        self.relationship = relationship

    def modules(self, ctx: MethodContext) -> dict[str, nn.Module]:
        return {"source_head": ctx.source_head}

    def attach(self, ctx: MethodContext) -> None:
        if self.relationship is None:
            raise ConfigError("regularizer=co_tuning needs a source stage (its kept head): use source=train "
                              "or source=checkpoint")

    def loss_term(self, step: Step) -> torch.Tensor:
        if self.relationship.device != step.logits.device:
            self.relationship = self.relationship.to(step.logits.device)
        log_probs = F.log_softmax(step.module.method_modules["source_head"](step.features), -1)
        return self.lam * -(self.relationship[step.y] * log_probs).sum(-1).mean()
