"""A multi-layer perceptron on flattened input: one Linear-ReLU(-Dropout) block per width."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List

from omegaconf import MISSING
from torch import nn

from transferlab.backbones.base import Backbone


@dataclass
class Config:
    _target_: str = MISSING
    hidden: List[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0


class MLP(Backbone):
    def __init__(self, input_shape: tuple[int, ...], hidden: list[int], dropout: float = 0.0):
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
