"""No regularizer: plain fine-tuning."""

from dataclasses import dataclass

from omegaconf import MISSING

from transferlab.regularizers.base import Regularizer


@dataclass
class Config:
    _target_: str = MISSING


class NoRegularizer(Regularizer):
    def on_train_batch_end(self, *args, **kwargs) -> None:  # nothing to log
        pass
