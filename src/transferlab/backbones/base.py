"""The one backbone interface (timm-style), shared by every architecture.

- ``blocks``: an ``nn.ModuleList`` in input → output order. Freeze policies freeze blocks by
  index and give blocks their own learning rates; optimizers get one param group per block.
- ``feature_dim``: the width of the features a head reads.
- ``forward(x)``: runs the blocks, then pools, returning ``(N, feature_dim)``. For text backbones
  ``x`` is a dict (input_ids, attention_mask) and the backbone has a ``tokenizer``;
  ``token_features(x)`` is then ``(N, L, feature_dim)`` per-token features, before pooling, for
  token-level heads (NER, language modeling).

Inner outputs, for whatever needs them (the frozen-block cache, DELTA's feature maps, the
diagnostics' CKA), in two calls (timm's ``forward_intermediates`` is the model):

- ``forward_intermediates(x, indices, stop_early=False, pool=True)`` → ``(output, [block j's
  output for j in indices])``: one pass; ``output`` is what ``forward`` (``pool=False``:
  ``token_features``) returns, or None when ``stop_early`` ends the pass after the last chosen block.
- ``forward_from(k, x, pool=True)``: the rest of the pass from block ``k``, ``x`` being block k's
  input — the backbone's input for k = 0, else ``block_input(block k-1's output, batch)``: the
  output itself for images, ``{"hidden", "attention_mask"}`` for text (the layers need the mask).
  ``k = num_blocks`` only pools.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Backbone(nn.Module):
    blocks: nn.ModuleList
    feature_dim: int
    reads_text = False  # True: forward takes a dict of token tensors, and it has a `tokenizer` and `token_features`
    language_model = False  # True: it has its own next-token head (`language_model_head()`)
    pretrained = False  # True: its initial weights are pretrained (source=pretrained starts from them)

    def __init__(self) -> None:
        super().__init__()
        self.pool: nn.Module = nn.Identity()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as block 0 reads it (parameter-free: resizing, scaling)."""
        return x

    def block_input(self, output: torch.Tensor, x):
        """Block k's input given block k-1's output and the batch: images, the output itself; text,
        the hidden states with the batch's attention mask (the layers need it)."""
        return {"hidden": output, "attention_mask": x["attention_mask"]} if self.reads_text else output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(0, x)

    def forward_from(self, k: int, x, pool: bool = True) -> torch.Tensor:
        if k == 0:
            x = self.prepare_input(x)
        for block in self.blocks[k:]:
            x = block(x)
        return self.pool(x) if pool else x

    def forward_intermediates(self, x, indices: Sequence[int], stop_early: bool = False,
                              pool: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        stop = check_indices(indices, len(self.blocks), stop_early)
        x, kept = self.prepare_input(x), {}
        for j, block in enumerate(self.blocks[:stop]):
            x = block(x)
            kept[j] = x
        output = None if stop_early else (self.pool(x) if pool else x)
        return output, [kept[j] for j in indices]


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, L, d) token states → (N, d): the mean over each text's real tokens."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def check_indices(indices: Sequence[int], num_blocks: int, stop_early: bool) -> int:
    """The number of blocks the pass runs; indices must be real blocks (no negative counting)."""
    if not indices or any(not 0 <= j < num_blocks for j in indices):
        raise IndexError(f"block indices {list(indices)}: need at least one, each in 0..{num_blocks - 1}")
    return max(indices) + 1 if stop_early else num_blocks
