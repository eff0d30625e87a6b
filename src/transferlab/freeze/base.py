"""The freeze-policy interface (a `Method`, method.py) and the Lightning hooks that carry it out."""

from __future__ import annotations

import pytorch_lightning as pl

from transferlab.errors import ConfigError
from transferlab.method import Method


class FreezePolicy(Method):
    """Subclasses say which blocks are frozen in an epoch; this class applies it."""

    def frozen_blocks(self, epoch: int, num_blocks: int) -> set[int]:
        raise NotImplementedError

    def lr_scales(self, num_blocks: int) -> list[float]:
        """Learning-rate multiplier per block (the head always gets 1)."""
        return [1.0] * num_blocks

    def check(self, num_blocks: int, epochs: int) -> None:
        """Raise ConfigError for settings this backbone / schedule cannot honour."""

    # -- policies that change the backbone's modules (LoRA) ------------------------------------
    def check_backbone(self, backbone) -> None:
        """Raise ConfigError when this backbone cannot take the policy; runs before any stage."""

    def adapt_backbone(self, backbone, seed: int) -> None:
        """Change the backbone's modules for the target stage (LoRA injects adapters here).
        Called after the source stage, so it trains without them, and before the source
        statistics (EWC's Fisher), so those cover what the target stage trains. Default: nothing."""

    def adapter_settings(self) -> dict:
        """What `adapt_backbone` adds: part of the cache key of anything computed after it
        (EWC's Fisher). Empty when the policy leaves the backbone's modules alone."""
        return {}

    # -- derived -------------------------------------------------------------------------------
    def trainable_backbone_params(self, backbone, epochs: int) -> int:
        """Backbone parameters that train in at least one epoch (params/trainable in results).
        Block policies: every block not frozen in all epochs; finer policies (BitFit) override."""
        frozen = self.always_frozen(len(backbone.blocks), epochs)
        return sum(p.numel() for i, block in enumerate(backbone.blocks) if i not in frozen
                   for p in block.parameters())

    def always_frozen(self, num_blocks: int, epochs: int) -> set[int]:
        frozen = set(range(num_blocks))
        for epoch in range(epochs):
            frozen &= self.frozen_blocks(epoch, num_blocks)
        return frozen

    def _require(self, ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    # -- Lightning hooks -----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        # Before DDP wraps the model (strategy setup): DDP registers the parameters that need
        # gradients when it wraps, so always-frozen ones must be marked before, not after.
        blocks = pl_module.backbone.blocks
        self._static = self.always_frozen(len(blocks), trainer.max_epochs)
        for i in self._static:
            blocks[i].requires_grad_(False)
        self._masked: list = []

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        # A run resumed mid-epoch skips on_train_epoch_start: take the epoch's policy here too.
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        blocks = pl_module.backbone.blocks
        frozen = self.frozen_blocks(trainer.current_epoch, len(blocks))
        pl_module.set_frozen_blocks(frozen)
        self._masked = [p for i in sorted(frozen - self._static) for p in blocks[i].parameters()]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module, optimizer) -> None:
        for p in self._masked:  # frozen this epoch only: drop the gradient, the optimizer skips it
            p.grad = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        pl_module.backbone.requires_grad_(True)  # the shared backbone leaves as it came
        pl_module.set_frozen_blocks(set())
