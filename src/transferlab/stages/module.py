"""The LightningModule both stages use: a backbone (shared between stages), a task head, the
task that judges it (tasks.py), and — in the target stage — the methods' loss terms and modules."""

from __future__ import annotations

import functools

import pytorch_lightning as pl
import torch
from torch import nn

from transferlab.collectives import sum_across_ranks
from transferlab.errors import NonFiniteLossError
from transferlab.method import MethodContext, Step, log_to_loggers
from transferlab.tasks import Classification, Task, to_device


class TaskModule(pl.LightningModule):
    """`stage` ("source" / "target") prefixes every logged metric.

    `optimizer(groups, lr=, weight_decay=)` and `scheduler(optimizer, total_steps=)` are Hydra
    partials (conf/optimizer, conf/scheduler); None: AdamW at a constant rate. `methods`: the
    target stage's methods; those with a loss term add it in `training_step`, and the modules
    they ask for (`Method.modules`) train with the head."""

    def __init__(self, backbone: nn.Module, head: nn.Module, *, stage: str, lr: float, task: Task | None = None,
                 weight_decay: float = 0.0, lr_scales: list[float] | None = None, optimizer=None, scheduler=None,
                 methods=(), context: MethodContext | None = None):
        super().__init__()
        self.backbone, self.head, self.stage = backbone, head, stage
        self.task = task if task is not None else Classification(head.out_features)
        self.lr, self.weight_decay = lr, weight_decay
        self.lr_scales = lr_scales or [1.0] * len(backbone.blocks)
        self.make_optimizer = optimizer or functools.partial(torch.optim.AdamW)
        self.make_scheduler = scheduler
        self.context = context if context is not None else MethodContext(backbone=backbone, head=head, task=self.task)
        self.loss_methods = [m for m in methods if m.has_loss_term]
        # blocks whose outputs a loss term reads (DELTA's feature maps): one forward returns them
        self.read_blocks = sorted({j for m in self.loss_methods for j in m.reads_blocks(backbone)})
        extra = {name: module for m in methods for name, module in m.modules(self.context).items()}
        self.method_modules = nn.ModuleDict(extra)
        self.frozen_blocks: set[int] = set()

    @property
    def token_level(self) -> bool:
        return self.task.token_level

    def features(self, x) -> torch.Tensor:
        # Token classification (NER): every token's features, (N, L, d); else pooled, (N, d).
        return self.backbone.token_features(x) if self.token_level else self.backbone(x)

    def forward(self, x) -> torch.Tensor:
        return self.head(self.features(x))

    # -- frozen blocks behave as fixed feature extractors (BatchNorm keeps its statistics) -----
    def set_frozen_blocks(self, frozen: set[int]) -> None:
        self.frozen_blocks = set(frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for i in self.frozen_blocks:
                self.backbone.blocks[i].eval()
        return self

    # -- steps ----------------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # Our batches are tuples: x a tensor (images) or a dict of tensors (tokenized text).
        # Moving them directly skips Lightning's generic walk over the collection.
        return to_device(batch, device)

    def training_step(self, batch, batch_idx):
        x, y, *rest = batch  # the stages' loaders add the examples' positions in the training split
        index = rest[0] if rest else None
        blocks = {}
        if self.read_blocks:
            features, outputs = self.backbone.forward_intermediates(x, self.read_blocks, pool=not self.token_level)
            blocks = dict(zip(self.read_blocks, outputs))
        else:
            features = self.features(x)
        logits = self.head(features)
        loss = self.task.loss(logits, y)
        terms = {}
        if self.loss_methods:
            step = Step(x, y, index, features, logits, self, blocks)
            terms = {m.name: m.loss_term(step) for m in self.loss_methods}
            loss = loss + sum(terms.values())
        self._last_loss = loss.detach()
        # Checked (a host sync) on logging steps and at epoch end only: a NaN loss poisons the
        # weights, so every later loss is NaN too and is caught at the next check.
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.check_finite(self._last_loss)
            logged = {f"{self.stage}/train_loss": float(self._last_loss)}
            logged.update({f"{self.stage}/{name}_loss": float(term.detach()) for name, term in terms.items()})
            log_to_loggers(self.trainer, logged, self.global_step)
        return loss

    def on_train_epoch_end(self) -> None:
        self.check_finite(self._last_loss)

    def check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{self.stage} stage: training loss became {loss.item()} at epoch {self.current_epoch}, "
                f"step {self.global_step}; lower {self.stage}.lr or check the data"
            )

    def on_validation_epoch_start(self) -> None:
        self._tally, self._val_loss, self._val_count = self.task.new_tally(), 0.0, 0

    def validation_step(self, batch, batch_idx):
        x, y = batch[:2]
        logits = self(x)
        self._val_loss += self.task.loss(logits, y, reduction="sum")
        self._val_count += self.task.scored(y)
        self._tally = self.task.add(self._tally, logits, y)

    def on_validation_epoch_end(self) -> None:
        # Under DDP each rank validated its share: the task sums (or gathers) across ranks, so
        # every rank logs the metrics of the whole validation set.
        scores = self.task.scores(self._tally)
        loss, count = sum_across_ranks([float(self._val_loss), self._val_count])
        for name, value in scores.items():
            self.log(f"{self.stage}/val_{name}", value)
        self.log(f"{self.stage}/val_loss", loss / max(count, 1))

    def configure_optimizers(self):
        # One fixed param group per block (+ the head, + the methods' modules): freeze policies and
        # per-block learning rates work on groups that never change, which keeps resume and DDP
        # correct. A schedule multiplies every group's rate by the same factor per step.
        groups = [
            {"params": list(block.parameters()), "lr": self.lr * scale, "name": f"block{i}"}
            for i, (block, scale) in enumerate(zip(self.backbone.blocks, self.lr_scales))
            if any(True for _ in block.parameters())
        ]
        groups.append({"params": list(self.head.parameters()), "lr": self.lr, "name": "head"})
        if len(self.method_modules):
            groups.append({"params": list(self.method_modules.parameters()), "lr": self.lr, "name": "methods"})
        optimizer = self.make_optimizer(groups, lr=self.lr, weight_decay=self.weight_decay)
        schedule = self.make_scheduler(optimizer, total_steps=self.trainer.estimated_stepping_batches) \
            if self.make_scheduler is not None else None
        if schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
