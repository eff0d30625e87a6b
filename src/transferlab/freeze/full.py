"""Full fine-tuning: every block trains."""

from dataclasses import dataclass

from omegaconf import MISSING

from transferlab.freeze.base import FreezePolicy


@dataclass
class Config:
    _target_: str = MISSING


class FullFinetune(FreezePolicy):
    active = False

    def frozen_blocks(self, epoch: int, num_blocks: int) -> set[int]:
        return set()
