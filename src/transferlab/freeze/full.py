"""Full fine-tuning: every block trains."""

from transferlab.freeze.base import FreezePolicy


class FullFinetune(FreezePolicy):
    active = False

    def frozen_blocks(self, epoch: int, num_blocks: int) -> set[int]:
        return set()
