"""A small CNN: conv-BN-ReLU blocks, max-pooled while the image is at least 4 px wide."""

from __future__ import annotations


from torch import nn

from transferlab.backbones.base import Backbone
from transferlab.errors import ConfigError
from transferlab.config import PositiveInt


class SmallCNN(Backbone):
    def __init__(self, input_shape: tuple[int, ...], channels: list[PositiveInt]):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"backbone=cnn needs image input (C, H, W), got shape {tuple(input_shape)}; use backbone=mlp")
        in_channels, size = input_shape[0], min(input_shape[1:])
        blocks = []
        for out_channels in channels:
            layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                      nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
            if size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            blocks.append(nn.Sequential(*layers))
            in_channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = in_channels
