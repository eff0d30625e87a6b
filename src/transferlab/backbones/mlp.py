"""A multi-layer perceptron on flattened input: one Linear-ReLU(-Dropout) block per width."""

from __future__ import annotations

import math

from torch import nn

from transferlab.backbones.base import Backbone
from transferlab.config import PositiveInt, Probability


class MLP(Backbone):
    def __init__(self, input_shape: tuple[int, ...], hidden: list[PositiveInt], dropout: Probability = 0.0):
        super().__init__()
        width = math.prod(input_shape)
        blocks = []
        for i, out in enumerate(hidden):
            layers = [nn.Flatten()] if i == 0 else []
            layers += [nn.Linear(width, out), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            blocks.append(nn.Sequential(*layers))
            width = out
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = width
