"""LP-FT (Kumar et al., ICLR 2022): linear probe for `probe_epochs`, then fine-tune everything."""

from transferlab.freeze.base import FreezePolicy
from transferlab.config import PositiveInt


class LinearProbeThenFinetune(FreezePolicy):
    def __init__(self, probe_epochs: PositiveInt):
        self.probe_epochs = probe_epochs

    def check(self, num_blocks: int, epochs: int) -> None:
        self._require(0 < self.probe_epochs < epochs,
                      f"freeze.probe_epochs={self.probe_epochs}: must be in 1..{epochs - 1} "
                      f"so that target.epochs={epochs} leaves fine-tuning epochs")

    def frozen_blocks(self, epoch: int, num_blocks: int) -> set[int]:
        return set(range(num_blocks)) if epoch < self.probe_epochs else set()
