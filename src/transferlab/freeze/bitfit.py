"""BitFit (Ben Zaken et al., 2022): only the backbone's biases (and the head) train.

No block is frozen as a whole, so this is not a block schedule: at fit start every non-bias
backbone parameter gets ``requires_grad=False`` (no gradient is computed or stored for it, and
AdamW skips it), and at fit end the shared backbone is handed back fully trainable, as
`FreezePolicy` does for frozen blocks. Param groups stay one per block; they just hold fewer
parameters that ever get a gradient.
"""

from __future__ import annotations


import pytorch_lightning as pl
from torch import nn

from transferlab.errors import ConfigError
from transferlab.freeze.base import FreezePolicy


def is_bias(name: str) -> bool:
    # Linear / LayerNorm / BatchNorm biases; a LayerNorm's scale ("weight") is not a bias here.
    return name.rsplit(".", 1)[-1] == "bias"


class BitFit(FreezePolicy):
    def frozen_blocks(self, epoch: int, num_blocks: int) -> set[int]:
        return set()  # every block keeps training (its biases do); blocks stay in train mode

    def check_backbone(self, backbone) -> None:
        if not any(is_bias(name) for name, _ in backbone.blocks.named_parameters()):
            raise ConfigError(f"freeze=bitfit: {type(backbone).__name__} has no bias parameters (Llama-style layers "
                              "have none), so nothing in the backbone would train: use freeze=lora or freeze=linear_probe")

    def trainable_backbone_params(self, backbone: nn.Module, epochs: int) -> int:
        return sum(p.numel() for name, p in backbone.blocks.named_parameters() if is_bias(name))

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        for name, p in pl_module.backbone.blocks.named_parameters():
            if not is_bias(name):
                p.requires_grad_(False)
