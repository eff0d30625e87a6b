"""Accuracy of a model on a split: one pass in eval mode, no gradients."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    return correct / max(total, 1)
