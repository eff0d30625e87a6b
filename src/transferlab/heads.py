"""Task heads. Source and target each own one; the backbone between them is shared."""

from torch import nn


def classification_head(feature_dim: int, num_classes: int) -> nn.Linear:
    return nn.Linear(feature_dim, num_classes)
