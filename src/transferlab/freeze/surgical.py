"""Surgical fine-tuning (Lee et al., ICLR 2023): only the named blocks (and the head) train; every
other block stays frozen (eval mode, BatchNorm statistics kept). Which block is best depends on
the shift: the first for input-level corruptions, middle ones for feature shift, the last for
label shift. Sweep "which single block" with `-m freeze=surgical freeze.train_blocks=[0],[1],[2]`.
"""

from __future__ import annotations

from transferlab.config import NonNegativeInt
from transferlab.freeze.base import FreezePolicy


class SurgicalFinetune(FreezePolicy):
    def __init__(self, train_blocks: list[NonNegativeInt]):
        self.train_blocks = sorted(set(train_blocks))

    def check(self, num_blocks: int, epochs: int) -> None:
        self._require(bool(self.train_blocks), "freeze.train_blocks=[]: name at least one block to train "
                                               "(freeze=linear_probe trains the head alone)")
        outside = [i for i in self.train_blocks if i >= num_blocks]
        self._require(not outside, f"freeze.train_blocks={self.train_blocks}: block {outside[0] if outside else ''} "
                                   f"is out of range; the backbone has {num_blocks} blocks (0..{num_blocks - 1})")

    def frozen_blocks(self, epoch: int, num_blocks: int) -> set[int]:
        return set(range(num_blocks)) - set(self.train_blocks)
