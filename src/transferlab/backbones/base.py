"""The one backbone interface (timm-style), shared by every architecture.

- ``blocks``: an ``nn.ModuleList`` in input → output order. Freeze policies freeze blocks by
  index and give blocks their own learning rates; optimizers get one param group per block.
- ``feature_dim``: the width of the features a head reads.
- ``forward(x)``: runs the blocks, then ``pool`` (parameter-free), returning ``(N, feature_dim)``.
  For text encoders ``x`` is a dict (input_ids, attention_mask) and the backbone has a ``tokenizer``.
- ``token_features(x)`` (text encoders only): ``(N, L, feature_dim)`` per-token features, before
  pooling, for token-classification heads (NER).
"""

from __future__ import annotations

import torch
from torch import nn


class Backbone(nn.Module):
    blocks: nn.ModuleList
    feature_dim: int
    reads_text = False  # True: forward takes a dict of token tensors and the backbone has a `tokenizer`
    pretrained = False  # True: its initial weights are pretrained (source=pretrained starts from them)

    def __init__(self) -> None:
        super().__init__()
        self.pool: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.pool(x)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)
