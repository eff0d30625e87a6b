"""Any peft adapter as a freeze policy (pip install -e '.[nlp]'): `freeze=peft` takes the peft
config as a `_target_` node — `peft.LoraConfig` (DoRA: `use_dora: true`), `peft.IA3Config`,
`peft.LoHaConfig`, ... — and Hydra builds it; `conf/freeze/dora.yaml` and `ia3.yaml` are two such
options, and `freeze=lora` (lora.py) is this policy with LoRA's four settings as its own keys.

The backbone's weights stay put; the adapters peft injects (`adapt_backbone`, after the source
stage and before the source statistics, from their own seed) train with the new head. What trains
is what peft names with its tuner's prefix (`lora_`, `ia3_`, `hada_`, ...), plus biases when the
config's `bias` says so: `setup` sets exactly that, and `adapt_backbone` checks it against what peft
itself marked trainable, so a setting that would train something else is refused, not miscounted.

What the architecture decides is filled in once per run (`resolved_config`), before anything is
keyed by it: `target_modules: null` → for a LoRA config (DoRA included) the projections of the
architecture's family (`default_targets`: [query, value] for BERT-style encoders, GPT-2's fused
Conv1D projections, every attention and MLP projection for Llama / Qwen / Mistral / OPT); for other
adapters, and for LoRA on a family the table lacks, peft's own defaults for the backbone's
`model_type` (IA3: keys, values and the feedforward output, its `feedforward_modules` likewise).
`fan_in_fan_out` follows the targets: true on transformers' Conv1D (GPT-2), a Linear stored
transposed.

Cache keys: `settings["config"]` and `adapter_settings()` hold the whole peft config as plain
values (every field, defaults included, sets sorted, enums by value; `_target_` names the class;
peft's bookkeeping fields — its version, the base model's name — left out), so any setting, present
or added by a later peft, keeps statistics computed on the adapted model (EWC's Fisher) apart.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import inspect
import re
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from transferlab.errors import ConfigError, TransferlabError
from transferlab.freeze.base import FreezePolicy

# By architecture: the family with the most of its names in the backbone; those names are kept.
FAMILY_TARGETS = (
    ("query", "value"),  # BERT / RoBERTa / MiniLM / ELECTRA
    ("c_attn", "c_proj", "c_fc"),  # GPT-2 (Conv1D)
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),  # Llama, Qwen, Mistral
    ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),  # OPT
)

# Fields of a peft config that say where it came from, not which adapters it builds.
BOOKKEEPING = ("peft_version", "auto_mapping", "base_model_name_or_path", "revision")


def import_peft():
    try:
        import peft
    except ImportError:
        raise TransferlabError("adapter freeze policies (freeze=lora, peft, dora, ia3) need peft: "
                               "pip install -e '.[nlp]'") from None
    return peft


# -- which modules ----------------------------------------------------------------------------------
def targets(backbone: nn.Module, names) -> list[tuple[str, nn.Module]]:
    """The modules peft will adapt: those whose name is, or ends with, one of `names` (a string:
    a regular expression the whole name matches, as peft reads it)."""
    if names is None:
        return []
    if isinstance(names, str):
        return [(path, m) for path, m in backbone.named_modules() if path and re.fullmatch(names, path)]
    return [(path, m) for path, m in backbone.named_modules()
            if any(path == n or path.endswith("." + n) for n in names)]


def default_targets(backbone: nn.Module) -> list[str] | None:
    """LoRA's targets by architecture (FAMILY_TARGETS); None: no family's names are there."""
    present = [[name for name in family if targets(backbone, [name])] for family in FAMILY_TARGETS]
    best = max(present, key=len)  # ties: the earlier family
    return best or None


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def model_type(backbone: nn.Module) -> str | None:
    """The Hugging Face `model_type` under the backbone (bert, gpt2, llama, ...), which peft's own
    default targets are keyed by; None for the others."""
    config = getattr(backbone, "model_config", None) or getattr(getattr(backbone, "model", None), "config", None)
    return getattr(config, "model_type", None)


def peft_defaults(tuner: type, config, kind: str | None):
    """peft's per-model-type defaults filled into `config`. `_prepare_adapter_config` is a
    staticmethod on some tuners and a method reading only class attributes on others (LoRA's
    `target_module_mapping`), so it is called on the class either way."""
    prepare = inspect.getattr_static(tuner, "_prepare_adapter_config")
    args = (config, {"model_type": kind})
    return prepare.__func__(*args) if isinstance(prepare, staticmethod) else prepare(tuner, *args)


# -- the config as plain values ---------------------------------------------------------------------
def plain_value(value):
    """A config field as JSON values: enums by value, sets sorted, dataclasses and OmegaConf
    containers as dicts and lists."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, enum.Enum):
        return plain_value(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain_value(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((plain_value(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def class_path(cls: type) -> str:
    peft = import_peft()
    if getattr(peft, cls.__name__, None) is cls:
        return f"peft.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def describe(config) -> dict:
    """The whole peft config as plain values (what cache keys hold): `_target_` + every field."""
    fields = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    return {"_target_": class_path(type(config)),
            **{k: plain_value(v) for k, v in sorted(fields.items()) if k not in BOOKKEEPING}}


def as_peft_config(config, key: str = "freeze.config"):
    """A peft config from its `_target_` node (what the options hand over: `_recursive_: false`, so
    peft's own complaints about a value come out as one line naming `key`), or the config itself
    (its list fields, if Hydra built it, still OmegaConf containers: made plain, so peft's own
    normalization runs on them)."""
    peft = import_peft()
    if isinstance(config, (Mapping, DictConfig)):
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        try:
            config = instantiate(config, _convert_="all")
        except InstantiationException as e:
            cause = e.__cause__ or e
            first = str(cause).splitlines()[0] if str(cause) else ""
            raise ConfigError(f"{key}: {type(cause).__name__}: {first}") from None
    if not isinstance(config, peft.PeftConfig):
        raise ConfigError(f"{key}: {type(config).__name__} is not a peft config; give one as a node "
                          "with _target_: peft.LoraConfig, peft.IA3Config, ...")
    changes = {f.name: OmegaConf.to_container(getattr(config, f.name), resolve=True) for f in dataclasses.fields(config)
               if f.init and isinstance(getattr(config, f.name, None), (DictConfig, ListConfig))}
    return dataclasses.replace(config, **changes) if changes else config


def tuner_prefix(config) -> str:
    """What peft names this adapter's parameters with (`lora_`, `ia3_`, `hada_`, ...)."""
    peft = import_peft()
    tuner = peft.PEFT_TYPE_TO_TUNER_MAPPING.get(config.peft_type)
    prefix = getattr(tuner, "prefix", None)
    if not prefix:
        raise ConfigError(f"freeze.config._target_={class_path(type(config))}: {config.peft_type} is not an "
                          "adapter peft can inject into a model (prompt learning is not); use LoRA, DoRA, IA3, "
                          "LoHa, LoKr, ...")
    return prefix


class PeftAdapters(FreezePolicy):
    """peft adapters, as `config` (a peft config, or its `_target_` node) says; only they and the
    head train."""

    # where a config field is set: `freeze.config.<field>` (LoRA's own keys: `freeze.<key>`)
    config_key = "freeze.config"

    def __init__(self, config: Any):
        self.config = as_peft_config(config, self.config_key)
        self.prefix = tuner_prefix(self.config)
        self._resolved = None
        if "config" in (self._settings or {}):  # the recorded argument: Hydra's built object, as plain fields
            self._settings = {**self._settings, "config": describe(self.config)}

    def key(self, field: str) -> str:
        return f"{self.config_key}.{field}"

    # -- what the architecture decides, once ------------------------------------------------------
    def resolve(self, backbone: nn.Module):
        """The config this run injects (see resolved_config), fixed at first use: before
        `adapter_settings` enters a cache key."""
        if self._resolved is None:
            self._resolved = self.resolved_config(backbone)
        return self._resolved

    def resolved_config(self, backbone: nn.Module):
        """The config with what the architecture decides filled in (module docstring). Filled-in
        fields go through `dataclasses.replace`, so peft's __post_init__ runs on them as on given ones."""
        peft = import_peft()
        config = copy.deepcopy(self.config)
        if isinstance(config, peft.LoraConfig) and config.target_modules is None and default_targets(backbone):
            config = dataclasses.replace(config, target_modules=default_targets(backbone))
        if getattr(config, "target_modules", "") is None or getattr(config, "feedforward_modules", "") is None:
            kind = model_type(backbone)
            try:  # peft's defaults for this model type (target_modules, IA3's feedforward_modules)
                config = peft_defaults(peft.PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type], config, kind)
            except (ValueError, KeyError, AttributeError):
                raise ConfigError(
                    f"{self.key('target_modules')}=null: {type(backbone).__name__} "
                    f"({'model_type ' + kind if kind else 'not a Hugging Face model'}) has no default target modules "
                    f"for {type(config).__name__}; adapters need a transformer backbone (backbone=minilm, hf or "
                    "hf_causal), or name its layers (target_modules, and feedforward_modules for IA3)") from None
        if hasattr(config, "fan_in_fan_out"):
            transposed = any(is_conv1d(m) for _, m in targets(backbone, config.target_modules))
            if config.fan_in_fan_out != transposed:
                config = dataclasses.replace(config, fan_in_fan_out=transposed)
        return config

    def check_backbone(self, backbone: nn.Module) -> None:
        config = self.resolve(backbone)
        if getattr(config, "inference_mode", False):
            raise ConfigError(f"{self.key('inference_mode')}=true: peft would freeze the adapters, so nothing "
                              "in the backbone would train")
        if getattr(config, "modules_to_save", None):
            raise ConfigError(f"{self.key('modules_to_save')}: the task's head is trained by the stage itself; "
                              "other whole modules are not adapters (use freeze=partial for that)")
        names = getattr(config, "target_modules", None)
        if names is not None and not targets(backbone, names):
            shown = sorted(names) if isinstance(names, (set, frozenset)) else names
            raise ConfigError(f"{self.key('target_modules')}={shown}: {type(backbone).__name__} has no module of "
                              "these names; adapters need a transformer backbone (backbone=minilm, hf or hf_causal) "
                              "whose layers they name")

    def frozen_blocks(self, epoch: int, num_blocks: int) -> set[int]:
        return set()  # no block is frozen as a whole: blocks stay in train mode (dropout on)

    def adapter_settings(self) -> dict:
        """The whole injected config, as plain values (before injection: as given)."""
        return {"peft": describe(self._resolved if self._resolved is not None else self.config)}

    # -- injection and what trains ----------------------------------------------------------------
    def trains(self, name: str) -> bool:
        """Whether the backbone parameter `name` trains: an adapter's, or a bias the config's
        `bias` setting trains with them ("all": every bias; "lora_only" and the like: the adapted
        layers')."""
        if self.prefix in name:
            return True
        bias = getattr(self.config, "bias", "none")
        if bias == "all":
            return name.endswith(".bias")
        return bias not in (None, "none") and name.endswith(".base_layer.bias")

    def adapt_backbone(self, backbone: nn.Module, seed: int) -> None:
        peft = import_peft()
        config = self.resolve(backbone)
        # The adapters' random init from their own seed: the same adapters (and the same EWC
        # Fisher, which depends on them) whether the source stage was trained just now or came from the cache.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            peft.inject_adapter_in_model(copy.deepcopy(config), backbone)
        marked = {n for n, p in backbone.named_parameters() if p.requires_grad}
        ours = {n for n, _ in backbone.named_parameters() if self.trains(n)}
        if marked != ours:
            odd = sorted(marked ^ ours)[0]
            raise ConfigError(f"{self.config_key}: peft {'trains' if odd in marked else 'freezes'} {odd}, which this "
                              "policy does not; only the adapters (and biases through `bias`) can train")

    def trainable_backbone_params(self, backbone: nn.Module, epochs: int) -> int:
        return sum(p.numel() for name, p in backbone.named_parameters() if self.trains(name))

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        names = [name for name, _ in pl_module.backbone.named_parameters()]
        if not any(self.prefix in n for n in names):
            raise RuntimeError(f"freeze={self.name}: the backbone has no adapters; adapt_backbone was not called")
        # peft froze the base at injection already; set it here too, so the stage does not
        # depend on what happened to the shared backbone in between.
        for name, p in pl_module.backbone.named_parameters():
            p.requires_grad_(self.trains(name))
