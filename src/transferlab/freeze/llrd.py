"""Layer-wise learning-rate decay (ELECTRA; ULMFiT's discriminative fine-tuning): nothing is
frozen, but blocks further from the head learn more slowly, so general low-level features move
least. With the head at depth max_depth = num_blocks and block i at depth i:

    lr_i = lr * decay^(max_depth - i)      (the head gets lr; the block next to it lr * decay)

Carried out through `lr_scales`: the fixed per-block param groups get these rates.
"""

from transferlab.freeze.base import FreezePolicy
from typing import Annotated

from transferlab.config import Bounds


class LayerwiseLRDecay(FreezePolicy):
    def __init__(self, decay: Annotated[float, Bounds(gt=0, le=1)]):
        self.decay = decay

    def check(self, num_blocks: int, epochs: int) -> None:
        self._require(0 < self.decay <= 1, f"freeze.decay={self.decay}: must be in (0, 1]")

    def frozen_blocks(self, epoch: int, num_blocks: int) -> set[int]:
        return set()

    def lr_scales(self, num_blocks: int) -> list[float]:
        return [self.decay ** (num_blocks - depth) for depth in range(num_blocks)]
