"""LoRA (Hu et al., 2022) through peft: the backbone's weights stay put; a rank-r update
ΔW = (alpha / r) · B A is learned next to each targeted Linear (attention query and value by
default), plus the new head.

`target_modules: null` (the default) resolves by architecture, from the module names the backbone
has (`default_targets`): BERT-style encoders get [query, value] (the LoRA paper's choice, and what
the cache keys of earlier runs hold); GPT-2 its fused attention and MLP projections (transformers'
Conv1D, a Linear stored transposed: peft adapts it with fan_in_fan_out); Llama / Qwen / Mistral
(and OPT) every attention and MLP projection.

The adapters are injected by `adapt_backbone`, which the experiment calls after the source stage
and before the target stage. peft wraps each targeted nn.Linear as `base_layer` (the very same
Parameter objects, now under `...query.base_layer.weight`) and initializes B = 0, so at injection
the backbone computes exactly what it did: the source accuracy measured before and after the
target stage, and the EWC Fisher taken after injection, refer to the same function. Regularizers
"apply to what trains": only adapter parameters get gradients, so only they are penalized
(L2-SP anchors A at its init and B at 0, i.e. it pulls ΔW toward 0).

Param groups stay one per block: the adapters live inside the layer blocks; the frozen base
weights in those groups have requires_grad=False, never get a gradient, and AdamW skips them.
"""

from __future__ import annotations


import pytorch_lightning as pl
import torch
from torch import nn

from transferlab.config import Positive, PositiveInt, Probability
from transferlab.errors import ConfigError, TransferlabError
from transferlab.freeze.base import FreezePolicy

ADAPTER_PREFIX = "lora_"  # peft names adapter parameters ...lora_A.default.weight / lora_B...


# By architecture: the family with the most of its names in the backbone; those names are kept.
FAMILY_TARGETS = (
    ("query", "value"),  # BERT / RoBERTa / MiniLM / ELECTRA
    ("c_attn", "c_proj", "c_fc"),  # GPT-2 (Conv1D)
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),  # Llama, Qwen, Mistral
    ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),  # OPT
)


def is_adapter(name: str) -> bool:
    return ADAPTER_PREFIX in name


def targets(backbone: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """The modules peft will adapt: those whose name is, or ends with, one of `names`."""
    return [(path, m) for path, m in backbone.named_modules()
            if any(path == n or path.endswith("." + n) for n in names)]


def default_targets(backbone: nn.Module) -> list[str] | None:
    present = [[name for name in family if targets(backbone, [name])] for family in FAMILY_TARGETS]
    best = max(present, key=len)  # ties: the earlier family
    return best or None


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


class LoRA(FreezePolicy):
    def __init__(self, r: PositiveInt, alpha: Positive, dropout: Probability, target_modules: list[str] | None = None):
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = None if target_modules is None else list(target_modules)

    def resolve_targets(self, backbone: nn.Module) -> None:
        """`target_modules: null` → the architecture's default, fixed from here on (before
        `adapter_settings` enters a cache key)."""
        if self.target_modules is None:
            self.target_modules = default_targets(backbone)
            if self.target_modules is None:
                raise ConfigError(f"freeze.target_modules=null: {type(backbone).__name__} has no query/value, c_attn "
                                  "or q_proj modules to default to; LoRA needs a transformer backbone "
                                  "(backbone=minilm, hf or hf_causal), or name its Linear layers")

    def check_backbone(self, backbone: nn.Module) -> None:
        self.resolve_targets(backbone)
        found = targets(backbone, self.target_modules)
        key = f"freeze.target_modules={self.target_modules}"
        if not found:
            raise ConfigError(f"{key}: {type(backbone).__name__} has no module of these names; LoRA needs a "
                              "transformer backbone (backbone=minilm, hf or hf_causal) whose Linear layers they name")
        not_linear = [path for path, m in found if not (isinstance(m, nn.Linear) or is_conv1d(m))]
        if not_linear:
            raise ConfigError(f"{key}: {not_linear[0]} is not a Linear layer; name Linear layers "
                              "(e.g. query, key, value, dense)")

    def frozen_blocks(self, epoch: int, num_blocks: int) -> set[int]:
        return set()  # no block is frozen as a whole: blocks stay in train mode (dropout on)

    def adapter_settings(self) -> dict:
        return {"lora": {"r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                         "target_modules": self.target_modules}}

    def adapt_backbone(self, backbone: nn.Module, seed: int) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise TransferlabError("freeze=lora needs peft: pip install -e '.[nlp]'") from None
        self.resolve_targets(backbone)
        transposed = [is_conv1d(m) for _, m in targets(backbone, self.target_modules)]
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=self.target_modules, fan_in_fan_out=any(transposed))
        # A's random init from its own seed: the same adapters (and the same EWC Fisher, which
        # depends on A) whether the source stage was trained just now or came from the cache.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            inject_adapter_in_model(config, backbone)

    def trainable_backbone_params(self, backbone: nn.Module, epochs: int) -> int:
        return sum(p.numel() for name, p in backbone.named_parameters() if is_adapter(name))

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        names = [name for name, _ in pl_module.backbone.named_parameters()]
        if not any(is_adapter(n) for n in names):
            raise RuntimeError("freeze=lora: the backbone has no adapters; adapt_backbone was not called")
        # peft froze the base at injection already; set it here too, so the stage does not
        # depend on what happened to the shared backbone in between.
        for name, p in pl_module.backbone.named_parameters():
            p.requires_grad_(is_adapter(name))
