"""LwF, Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017).

Before the target stage, the kept source head's logits z_o on every target training input are
recorded once (eval mode: dropout off), at the weights the target stage starts from. The source
head then keeps training alongside the new target head, and the loss gains

    lam · T² · KL(softmax(z_o / T) ‖ softmax(ẑ_o / T))      (mean over the batch)

with ẑ_o the source head's logits on the same inputs now. T² keeps the gradient's scale
independent of the temperature (Hinton et al.'s distillation convention); the paper uses T = 2,
lam = 1. Forgetting is then measured with the source head LwF trained (not the head as the source
stage left it): how much of the source task the *whole model* still does.

On a language model (a language-modeling target) the source head is the model's own next-token
head, which *is* the target head, and the teacher is the start model's next-token distribution on
the target text, as LLM fine-tuning distils toward its reference model: the same KL at every real
token (padding skipped; mean over tokens), the teacher's logits computed alongside each step by a
frozen copy of the start model (backbone + head) — positions × vocabulary per text are too many to
keep (128 tweets × 32 tokens × SmolLM2's 49,152: 0.8 GB). That copy is one more forward per step
and one more model in memory, and it reads the raw batch (no frozen-block cache).

Shows the method contract end to end: statistics from the source model on the *target* data
(cached), a module that trains with the target head, and a loss term.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.config import NonNegative, Positive
from transferlab.errors import ConfigError
from transferlab.method import SOURCE_MODEL, TARGET_DATA, MethodContext, Step
from transferlab.regularizers.base import Regularizer
from transferlab.tasks import outputs


class LwF(Regularizer):
    statistics_inputs = (SOURCE_MODEL, TARGET_DATA)
    has_loss_term = True
    has_penalty = False
    statistics_excluded = ("lam", "temperature")  # the teacher's raw logits are the statistics
    # a language model's untied head trains from its start: its start weights are kept with the stage
    state_attributes = ("head_start",)

    def __init__(self, lam: NonNegative = 1.0, temperature: Positive = 2.0):
        self.lam, self.temperature = lam, temperature
        self.teacher: torch.Tensor | None = None  # (target train examples, source classes)
        self.language_modeling = False  # set from the task with the statistics, before the stage
        self.start: nn.ModuleList | None = None  # language modeling: the frozen start model (backbone, head)
        self.head_start: list[torch.Tensor] | None = None

    # Language modeling: the start copy reads the raw batch and is built from the start weights.
    @property
    def reads_raw_inputs(self) -> bool:
        return self.language_modeling

    @property
    def uses_start_weights(self) -> bool:
        return self.language_modeling

    @torch.no_grad()
    def compute_statistics(self, ctx: MethodContext) -> dict[str, torch.Tensor]:
        if ctx.task is not None and ctx.task.kind == "language_modeling":
            return {}  # the teacher runs alongside (see the module docstring)
        if ctx.task is not None and ctx.task.token_level:
            raise ConfigError("regularizer=lwf: the target task is token classification (NER), whose "
                              "per-token features the sequence source head cannot read; use l2sp or ewc")
        return {"teacher_logits": outputs(ctx.source_model, ctx.target_loader())[0]}

    def use_statistics(self, stats: dict[str, torch.Tensor], ctx: MethodContext) -> None:
        self.language_modeling = ctx.task is not None and ctx.task.kind == "language_modeling"
        if self.language_modeling:
            return
        teacher = stats["teacher_logits"]
        expected = ctx.source_head.out_features
        if teacher.ndim != 2 or teacher.shape[1] != expected:
            raise ValueError(f"LwF: teacher logits of shape {tuple(teacher.shape)}, expected (n, {expected})")
        self.teacher = teacher

    def modules(self, ctx: MethodContext) -> dict[str, nn.Module]:
        # a language model's source head is the target head: it trains already
        return {} if self.language_modeling else {"source_head": ctx.source_head}

    def attach(self, ctx: MethodContext) -> None:
        if self.language_modeling:
            # deep-copied together, so a head tied to the embeddings stays tied to the copy's
            self.start = copy.deepcopy(nn.ModuleList([ctx.backbone, ctx.head])).eval().requires_grad_(False)
            self.start[0].load_state_dict(ctx.start_weights)
            if self.head_start is None:  # a resumed run restores it after attach (the base class)
                self.head_start = [t.detach().clone() for t in ctx.head.state_dict().values()]
            return
        self.head_start = []  # the source head trains as a method module: its start is the teacher's logits
        if self.teacher is None:
            raise ConfigError("regularizer=lwf needs a source stage (its kept head is the teacher): "
                              "use source=train or source=checkpoint")

    def on_train_start(self, trainer, pl_module) -> None:
        if self.language_modeling:  # after a resume has restored head_start
            for tensor, start in zip(self.start[1].state_dict().values(), self.head_start):
                tensor.copy_(start)

    def loss_term(self, step: Step) -> torch.Tensor:
        if self.language_modeling:
            return self.language_model_term(step)
        if self.teacher.device != step.logits.device:
            self.teacher = self.teacher.to(step.logits.device)
        t = self.temperature
        student = step.module.method_modules["source_head"](step.features) / t
        teacher = self.teacher[step.index] / t
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
        return self.lam * t * t * kl

    def language_model_term(self, step: Step) -> torch.Tensor:
        """lam · T² · KL(start ‖ now) of the next-token distributions, mean over real tokens."""
        backbone, head = self.start
        with torch.no_grad():
            teacher = head(backbone.token_features(step.x))
        real = step.x["attention_mask"].bool()
        t = self.temperature
        student = F.log_softmax(step.logits[real].float() / t, -1)
        kl = F.kl_div(student, F.log_softmax(teacher[real].float() / t, -1), log_target=True, reduction="batchmean")
        return self.lam * t * t * kl
