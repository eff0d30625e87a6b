"""Partial fine-tuning: the first k blocks (closest to the input) stay frozen."""

from transferlab.freeze.base import FreezePolicy
from transferlab.config import NonNegativeInt


class PartialFreeze(FreezePolicy):
    def __init__(self, k: NonNegativeInt):
        self.k = k

    def check(self, num_blocks: int, epochs: int) -> None:
        self._require(0 <= self.k <= num_blocks,
                      f"freeze.k={self.k}: the backbone has {num_blocks} blocks; choose 0..{num_blocks}")

    def frozen_blocks(self, epoch: int, num_blocks: int) -> set[int]:
        return set(range(self.k))
