"""Linear probe: the backbone is a fixed feature extractor; only the head trains."""

from dataclasses import dataclass

from omegaconf import MISSING

from transferlab.freeze.base import FreezePolicy


@dataclass
class Config:
    _target_: str = MISSING


class LinearProbe(FreezePolicy):
    def frozen_blocks(self, epoch: int, num_blocks: int) -> set[int]:
        return set(range(num_blocks))
