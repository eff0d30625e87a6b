"""Linear probe: the backbone is a fixed feature extractor; only the head trains."""

from transferlab.freeze.base import FreezePolicy


class LinearProbe(FreezePolicy):
    def frozen_blocks(self, epoch: int, num_blocks: int) -> set[int]:
        return set(range(num_blocks))
