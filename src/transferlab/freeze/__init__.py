"""Freeze policies: which backbone blocks train in which epoch, and at what learning-rate scale.

One file per policy (a `FreezePolicy` subclass and its `Config` schema) plus one YAML in
conf/freeze/. Param groups never change during a run: blocks frozen for the whole stage get
``requires_grad=False`` before training starts (no gradient is computed for them), blocks frozen
for part of it have their gradients dropped before the optimizer step. So a resumed run, or DDP,
sees the same groups throughout (see NOTES: Lightning #20340, #6891, #8720).
"""

from transferlab.freeze.base import FreezePolicy

__all__ = ["FreezePolicy"]
