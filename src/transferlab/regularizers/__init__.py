"""Regularizers for the target stage: penalties that keep fine-tuning close to something.

Each adds the *exact gradient* of its penalty to ``.grad`` after backward, with fused foreach
ops, instead of adding the penalty to the loss: the gradient is the same, autograd never sees it,
and the step costs ~1.0x instead of 0.56-0.78x (NOTES §4). The penalty's value is computed under
no_grad, only on steps that log it. One file per regularizer plus one YAML in conf/regularizer/.
"""

from transferlab.regularizers.base import Regularizer

__all__ = ["Regularizer"]
