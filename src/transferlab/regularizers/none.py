"""No regularizer: plain fine-tuning."""

from dataclasses import dataclass

from omegaconf import MISSING

from transferlab.regularizers.base import Regularizer


@dataclass
class Config:
    _target_: str = MISSING


class NoRegularizer(Regularizer):
    active = False
