"""The LightningModule both stages use: a backbone (shared between stages) and a task head."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.distributed import gather_lists, sum_across_ranks
from transferlab.errors import NonFiniteLossError
from transferlab.stages.evaluate import entity_scores, tag_sequences, to_device


def log_to_loggers(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Per-step metrics straight to the loggers. `self.log` costs ~0.4-1 ms a call on CPU (its
    result-collection bookkeeping), a fifth of a small model's step; per-epoch metrics that
    callbacks read (val_acc for selection, early stopping) still go through `self.log`."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


class TaskModule(pl.LightningModule):
    """`task` ("source" / "target") prefixes every logged metric."""

    def __init__(self, backbone: nn.Module, head: nn.Module, *, task: str, lr: float,
                 weight_decay: float = 0.0, lr_scales: list[float] | None = None,
                 label_names: list[str] | None = None):
        super().__init__()
        self.backbone, self.head, self.task = backbone, head, task
        # label_names given: token classification (NER): the head reads every token's features,
        # the loss skips IGNORE (-100) positions, validation scores entities (seqeval F1).
        self.label_names = label_names
        self.token_level = label_names is not None
        self._val_true: list = []
        self._val_pred: list = []
        self.lr, self.weight_decay = lr, weight_decay
        self.lr_scales = lr_scales or [1.0] * len(backbone.blocks)
        self.frozen_blocks: set[int] = set()
        self._val_correct = self._val_loss = self._val_count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_level:
            return self.head(self.backbone.token_features(x))  # (N, L, num_tags)
        return self.head(self.backbone(x))

    def loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        # Token level: (N, L, C) → (N·L, C); positions labelled -100 (sub-tokens after the first,
        # special tokens, padding) are F.cross_entropy's ignore_index.
        return F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=-100, reduction=reduction)

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
        # Our batches are (x, y): x a tensor (images) or a dict of tensors (tokenized text).
        # Moving them directly skips Lightning's generic walk over the collection.
        return to_device(batch, device)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self(x), y)
        self._last_loss = loss.detach()
        # Checked (a host sync) on logging steps and at epoch end only: a NaN loss poisons the
        # weights, so every later loss is NaN too and is caught at the next check.
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.check_finite(self._last_loss)
            log_to_loggers(self.trainer, {f"{self.task}/train_loss": float(self._last_loss)}, self.global_step)
        return loss

    def on_train_epoch_end(self) -> None:
        self.check_finite(self._last_loss)

    def check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{self.task} stage: training loss became {loss.item()} at epoch {self.current_epoch}, "
                f"step {self.global_step}; lower {self.task}.lr or check the data"
            )

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self._val_loss += self.loss(logits, y, reduction="sum")
        if self.token_level:
            true_tags, pred_tags = tag_sequences(logits, y, self.label_names)
            self._val_true += true_tags
            self._val_pred += pred_tags
            self._val_count += int((y != -100).sum())
            return
        self._val_correct += (logits.argmax(-1) == y).sum()
        self._val_count += len(y)

    def on_validation_epoch_end(self) -> None:
        # Under DDP each rank validated its share: sum the counts (and gather the tag
        # sequences), so every rank logs the metric of the whole validation set.
        correct, loss, count = sum_across_ranks([float(self._val_correct), float(self._val_loss), self._val_count])
        count = max(count, 1)
        if self.token_level:  # selection on entity F1, the metric NER is judged by
            scores = entity_scores(gather_lists(self._val_true), gather_lists(self._val_pred))
            self.log(f"{self.task}/val_f1", scores["f1"])
            self.log(f"{self.task}/val_acc", scores["acc"])
            self._val_true, self._val_pred = [], []
        else:
            self.log(f"{self.task}/val_acc", correct / count)
        self.log(f"{self.task}/val_loss", loss / count)
        self._val_correct = self._val_loss = self._val_count = 0

    def configure_optimizers(self):
        # One fixed param group per block (+ the head): freeze policies and per-block learning
        # rates work on groups that never change, which keeps resume and DDP correct.
        groups = [
            {"params": list(block.parameters()), "lr": self.lr * scale, "name": f"block{i}"}
            for i, (block, scale) in enumerate(zip(self.backbone.blocks, self.lr_scales))
            if any(True for _ in block.parameters())
        ]
        groups.append({"params": list(self.head.parameters()), "lr": self.lr, "name": "head"})
        return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
