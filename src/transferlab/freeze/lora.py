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

`LoRA` is `PeftAdapters` (peft.py: any peft config, `freeze=peft`) with LoRA's four settings as its
own keys (`freeze.r`, `freeze.alpha`, `freeze.dropout`, `freeze.target_modules`): the same
`peft.LoraConfig` it always built, and the same `{"lora": {r, alpha, dropout, target_modules}}` in
cache keys, so earlier runs' entries stay valid. DoRA and other LoRA settings: `freeze=dora`, or
`freeze=peft` with any `peft.LoraConfig` field.
"""

from __future__ import annotations

from torch import nn

from transferlab.config import Positive, PositiveInt, Probability
from transferlab.errors import ConfigError
from transferlab.freeze.peft import FAMILY_TARGETS, PeftAdapters, default_targets, import_peft, is_conv1d, targets

# the architecture helpers live in peft.py (every adapter uses them); imported from here too (merge.py)
__all__ = ["ADAPTER_PREFIX", "FAMILY_TARGETS", "LoRA", "default_targets", "is_adapter", "is_conv1d", "targets"]

ADAPTER_PREFIX = "lora_"  # peft names adapter parameters ...lora_A.default.weight / lora_B...


def is_adapter(name: str) -> bool:
    return ADAPTER_PREFIX in name


class LoRA(PeftAdapters):
    config_key = "freeze"  # its settings are the option's own keys: freeze.r, freeze.target_modules, ...

    def __init__(self, r: PositiveInt, alpha: Positive, dropout: Probability, target_modules: list[str] | None = None):
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = None if target_modules is None else list(target_modules)
        super().__init__(import_peft().LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                  target_modules=self.target_modules))

    def resolve_targets(self, backbone: nn.Module) -> None:
        """`target_modules: null` → the architecture's default, fixed from here on (before
        `adapter_settings` enters a cache key)."""
        if self.target_modules is None:
            self.target_modules = default_targets(backbone)
            if self.target_modules is None:
                raise ConfigError(f"freeze.target_modules=null: {type(backbone).__name__} has no query/value, c_attn "
                                  "or q_proj modules to default to; LoRA needs a transformer backbone "
                                  "(backbone=minilm, hf or hf_causal), or name its Linear layers")

    def resolved_config(self, backbone: nn.Module):
        """The LoraConfig LoRA has always injected: the targets by architecture, fan_in_fan_out on Conv1D."""
        self.resolve_targets(backbone)
        transposed = [is_conv1d(m) for _, m in targets(backbone, self.target_modules)]
        return import_peft().LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                        target_modules=self.target_modules, fan_in_fan_out=any(transposed))

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
        super().check_backbone(backbone)

    def adapter_settings(self) -> dict:
        # LoRA's own form, as before PeftAdapters: earlier runs' statistics cache keys stay valid
        return {"lora": {"r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                         "target_modules": self.target_modules}}
