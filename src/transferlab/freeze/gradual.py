"""Gradual unfreezing with discriminative learning rates (ULMFiT, Howard & Ruder 2018).

In epoch e the top e+1 blocks train (counted from the output); the rest stay frozen, so the
block next to the head adapts first and the input-side blocks join one epoch at a time. Every
block's learning rate is divided by `lr_factor` per step away from the head:

    lr_i = lr * lr_factor^-(num_blocks - 1 - i)      (the top block and the head get lr)

Carried out by the base class's masking: blocks frozen in every epoch get requires_grad=False,
the others have their gradients dropped while frozen; param groups never change.
"""

from transferlab.freeze.base import FreezePolicy
from typing import Annotated

from transferlab.config import Bounds


class GradualUnfreeze(FreezePolicy):
    def __init__(self, lr_factor: Annotated[float, Bounds(ge=1)]):
        self.lr_factor = lr_factor

    def check(self, num_blocks: int, epochs: int) -> None:
        self._require(self.lr_factor >= 1,
                      f"freeze.lr_factor={self.lr_factor}: must be >= 1 (blocks nearer the input learn no faster)")

    def frozen_blocks(self, epoch: int, num_blocks: int) -> set[int]:
        return set(range(max(num_blocks - (epoch + 1), 0)))

    def lr_scales(self, num_blocks: int) -> list[float]:
        return [self.lr_factor ** -(num_blocks - 1 - i) for i in range(num_blocks)]
