"""No regularizer: plain fine-tuning."""

from transferlab.regularizers.base import Regularizer


class NoRegularizer(Regularizer):
    active = False
