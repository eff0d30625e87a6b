"""Any Hugging Face image model (ViT, DeiT, DINOv2, ConvNeXt, ResNet, Swin, the CLIP vision tower),
loaded from a local folder or the local HF cache.

`backbone=hf_vision backbone.name=<folder or hub id>`. The model's own modules are regrouped into
blocks, so freeze policies (by block index), per-block learning rates and regularizers see the
network like any other backbone. Block 0 is always the input adapter (parameter-free: pixels in
[0, 1], grayscale repeated to 3 channels, resized to the model's size, (x - mean) / std from the
folder's preprocessor_config.json) followed by the model's embeddings. Then, per family:

| family                   | blocks after block 0              | between blocks    | pooled features          |
|--------------------------|-----------------------------------|-------------------|--------------------------|
| ViT, DeiT, DINOv2 (+reg) | each layer, the final layernorm   | (N, L, d) tokens  | CLS (or mean of patches) |
| CLIP vision              | each layer, post_layernorm        | (N, L, d) tokens  | CLS (or mean of patches) |
| Swin                     | each stage, the final layernorm   | (N, C, h, w) maps | mean over the tokens     |
| ConvNeXt (V1, V2)        | each stage, mean over H, W + norm | (N, C, H, W) maps | the last block's (N, C)  |
| ResNet                   | each stage                        | (N, C, H, W) maps | mean over H, W           |

(CLIP's pre-layernorm belongs to block 0, after its embeddings.)

Each block maps one tensor to one tensor (small wrappers drop the tuples some layers return and
carry Swin's grid size as the shape of a feature map), so a block's output is what the next one
reads: what the frozen-prefix cache and DELTA's feature hooks rely on. The pooled features equal
the model's own: ViT/DeiT/DINOv2 the layernormed CLS of last_hidden_state, CLIP, Swin, ConvNeXt
and ResNet their pooler_output (ConvNeXt normalizes after pooling, hence its last block pools).
`pooling=mean` on a token model averages the patch tokens, without CLS / distillation / register
tokens (as timm's global_pool="avg"). ViT's own pooler (a trained dense + tanh on CLS) is dropped.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.backbones.base import Backbone
from transferlab.backbones.hf import import_transformers, offline_by_environment, quiet_transformers
from transferlab.config import PositiveInt
from transferlab.errors import ConfigError, TransferlabError

OPTION = "hf_vision"
PROCESSOR_FILE = "preprocessor_config.json"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224  # a model config without image_size (ResNet) and no processor config


@dataclass(frozen=True)
class Family:
    label: str
    layout: str  # "tokens" | "swin" | "conv"
    pooling: str  # the default
    prefix: int = 1  # tokens before the patches (CLS, distillation); registers are added from the config


FAMILIES = {
    "vit": Family("ViT", "tokens", "cls"),
    "deit": Family("DeiT", "tokens", "cls", prefix=2),
    "dinov2": Family("DINOv2", "tokens", "cls"),
    "dinov2_with_registers": Family("DINOv2", "tokens", "cls"),
    "clip": Family("CLIP vision", "tokens", "cls"),
    "clip_vision_model": Family("CLIP vision", "tokens", "cls"),
    "swin": Family("Swin", "swin", "mean", prefix=0),
    "convnext": Family("ConvNeXt", "conv", "mean", prefix=0),
    "convnextv2": Family("ConvNeXt V2", "conv", "mean", prefix=0),
    "resnet": Family("ResNet", "conv", "mean", prefix=0),
}
SUPPORTED = "ViT, DeiT, DINOv2, CLIP, Swin, ConvNeXt or ResNet"


# -- the blocks' pieces ---------------------------------------------------------------------------
class InputAdapter(nn.Module):
    """Parameter-free: (N, 1 or 3, H, W) pixels in [0, 1] → (N, 3, *image_size), (x - mean) / std."""

    def __init__(self, image_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.image_size, self.image_mean, self.image_std = image_size, mean, std
        # Not persistent: moved with the module, absent from state dicts (nothing to learn or anchor)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, len(self.image_mean), -1, -1)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


class Stem(nn.Module):
    """Block 0: the adapter, the model's embeddings, CLIP's pre-layernorm. Output: (N, L, d)
    tokens, or (N, C, H, W) for Swin (its tokens on their grid) and the convolutional models."""

    def __init__(self, adapter: InputAdapter, embeddings: nn.Module, pre_norm: Optional[nn.Module],
                 interpolate: bool):
        super().__init__()
        self.adapter, self.embeddings = adapter, embeddings
        self.pre_norm = pre_norm if pre_norm is not None else nn.Identity()
        # position embeddings resized to the grid when the image size is not the pretrained one
        self.kwargs = {"interpolate_pos_encoding": True} if interpolate else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adapter(x).to(next(self.embeddings.parameters()).dtype)
        out = self.embeddings(x, **self.kwargs)
        if isinstance(out, tuple):  # Swin: (tokens, (h, w))
            tokens, (h, w) = out
            return tokens.transpose(1, 2).reshape(len(tokens), -1, h, w)
        return self.pre_norm(out)


class TokenLayer(nn.Module):
    """One transformer layer, (N, L, d) → (N, L, d). Arguments a layer requires besides the
    hidden states (CLIP's attention masks) get None: every token sees every token."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        rest = list(inspect.signature(layer.forward).parameters.values())[1:]
        self.nones = sum(p.default is inspect.Parameter.empty
                         and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x, *[None] * self.nones)
        return out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple


class SwinStage(nn.Module):
    """One Swin stage on (N, C, h, w): the grid size travels as the map's shape, not a tuple."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        out = self.stage(x.flatten(2).transpose(1, 2).contiguous(), (h, w))[0]
        if self.stage.downsample is not None:  # patch merging halves the grid (odd sizes padded)
            h, w = (h + 1) // 2, (w + 1) // 2
        return out.transpose(1, 2).reshape(n, -1, h, w)


class TokenNorm(nn.Module):
    """Swin's final layernorm: (N, C, h, w) → (N, h*w, C) normalized tokens."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.flatten(2).transpose(1, 2))


class PooledNorm(nn.Module):
    """ConvNeXt's head: global average pool over H, W, then its final layernorm: (N, C)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.mean((-2, -1)))


class TokenPool(nn.Module):
    """(N, L, d) → (N, d): the CLS token, or the mean of the tokens after `prefix`."""

    def __init__(self, pooling: str, prefix: int):
        super().__init__()
        self.pooling, self.prefix = pooling, prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.pooling == "cls" else x[:, self.prefix:].mean(1)


class SpatialMean(nn.Module):
    """(N, C, H, W) → (N, C): ResNet's global average pool."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1))


# -- the backbone ---------------------------------------------------------------------------------
class HFVision(Backbone):
    pretrained = True
    reads_text = False

    def __init__(self, name: str, pooling: Optional[Literal["cls", "mean"]] = None,
                 image_size: Optional[PositiveInt] = None, local_files_only: Optional[bool] = None,
                 input_shape: Optional[tuple[int, ...]] = None):
        super().__init__()
        if input_shape is not None and (len(input_shape) != 3 or input_shape[0] not in (1, 3)):
            raise ConfigError(f"backbone={OPTION} needs images (1 or 3 channels, H, W), got shape "
                              f"{tuple(input_shape)}; use backbone=mlp")
        if image_size is not None and image_size < 1:
            raise ConfigError(f"backbone.image_size={image_size}: must be >= 1 (or null for the model's size)")
        transformers = import_transformers(OPTION)
        folder = Path(name).expanduser()
        local = folder.is_dir()
        if not local and (folder.is_absolute() or name.startswith(".")):
            raise TransferlabError(f"backbone.name={name}: no such folder; point it at a saved model folder "
                                   "(config.json + weights) or a hub id in the local HF cache")
        source = str(folder) if local else name
        offline = local or (offline_by_environment() if local_files_only is None else local_files_only)
        where = "the local folder" if local else ("the local HF cache (offline)" if offline else "the hub")
        try:
            with quiet_transformers(transformers):
                config = transformers.AutoConfig.from_pretrained(source, local_files_only=offline)
                family = image_family(config, name)
                # CLIP: the vision tower alone (CLIPVisionModel reads it from a full CLIP checkpoint)
                loader = transformers.CLIPVisionModel if config.model_type == "clip" else transformers.AutoModel
                model = loader.from_pretrained(source, local_files_only=offline)
        except (OSError, ValueError) as e:
            raise TransferlabError(f"backbone.name={name}: cannot load an image model from {where} "
                                   f"({type(e).__name__}); point it at a local model folder, or download it "
                                   "once with the network on (HF_HUB_OFFLINE unset)") from None
        model.float()  # a checkpoint saved in half precision loads as such; the trainer sets precision
        pooling = pooling or family.pooling
        if pooling == "cls" and family.layout != "tokens":
            raise ConfigError(f"backbone.pooling=cls: {family.label} ({name}) has no CLS token; use mean (or null)")
        processor = read_processor_config(transformers, source, local, offline)
        pretrained_size = as_size(getattr(model.config, "image_size", None))
        size = ((image_size, image_size) if image_size is not None
                else processor_size(processor) or pretrained_size or (DEFAULT_SIZE, DEFAULT_SIZE))
        mean, std = normalization(processor, model.config.num_channels, name)
        self.name, self.family, self.pooling = name, family.label, pooling
        self.image_size, self.image_mean, self.image_std = size, mean, std
        self.model_config, self._model_class, self._spec = model.config, type(model), family
        self._resized = pretrained_size is not None and size != pretrained_size  # position embeddings interpolated
        self.blocks, self.pool, self.feature_dim = self._build(model)
        self.train()  # from_pretrained returns eval mode; Lightning decides from here on

    def _build(self, model: nn.Module) -> tuple[nn.ModuleList, nn.Module, int]:
        """(blocks, pool, feature_dim) from the model's modules (the model itself is not kept:
        every parameter lives in a block, as the frozen-prefix cache requires)."""
        family = self._spec
        embeddings, pre_norm, layers, norm = model_parts(model)
        interpolate = self._resized and "interpolate_pos_encoding" in inspect.signature(embeddings.forward).parameters
        stem = Stem(InputAdapter(self.image_size, self.image_mean, self.image_std), embeddings, pre_norm, interpolate)
        if family.layout == "tokens":
            prefix = family.prefix + getattr(model.config, "num_register_tokens", 0)
            blocks, pool = [stem, *map(TokenLayer, layers), norm], TokenPool(self.pooling, prefix)
        elif family.layout == "swin":
            blocks, pool = [stem, *map(SwinStage, layers), TokenNorm(norm)], TokenPool("mean", 0)
        elif norm is not None:  # ConvNeXt: its layernorm acts on the pooled vector, so its last block pools
            blocks, pool = [stem, *layers, PooledNorm(norm)], nn.Identity()
        else:  # ResNet
            blocks, pool = [stem, *layers], SpatialMean()
        width = norm.normalized_shape[-1] if norm is not None else model.config.hidden_sizes[-1]
        return nn.ModuleList(blocks), pool, width

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init as transformers does it for this architecture (source=scratch: the
        no-transfer baseline): a fresh model of the same config, its weights copied in."""
        transformers = import_transformers(OPTION)
        with quiet_transformers(transformers):
            fresh = self._model_class._from_config(self.model_config).float()
        blocks, _, _ = self._build(fresh)
        self.blocks.load_state_dict(blocks.state_dict())


# -- reading the model folder ---------------------------------------------------------------------
def image_family(config, name: str) -> Family:
    family = FAMILIES.get(config.model_type)
    if family is not None:
        return family
    vision = hasattr(config, "vision_config") or hasattr(config, "num_channels") or hasattr(config, "image_size")
    if not vision:
        raise ConfigError(f"backbone.name={name}: {config.model_type} is not an image model; backbone={OPTION} "
                          f"takes {SUPPORTED} (for a text encoder use backbone=hf)")
    raise ConfigError(f"backbone.name={name}: image model type {config.model_type} is not supported by "
                      f"backbone={OPTION}; use {SUPPORTED}")


def model_parts(model: nn.Module) -> tuple[nn.Module, Optional[nn.Module], nn.ModuleList, Optional[nn.Module]]:
    """(embeddings, pre-norm, layers or stages, final norm) under the names transformers 4 and 5 use."""
    root = getattr(model, "vision_model", model)  # CLIPVisionModel in transformers 4 wraps the tower
    encoder = getattr(root, "encoder", None)
    embeddings = first(root, "embeddings", "embedder")  # ResNet: embedder
    candidates = [getattr(root, "layers", None), *(getattr(encoder, n, None) for n in ("layer", "layers", "stages"))]
    layers = next(m for m in candidates if isinstance(m, nn.ModuleList))
    return embeddings, first(root, "pre_layrnorm"), layers, first(root, "layernorm", "post_layernorm")


def first(module: nn.Module, *names: str) -> Optional[nn.Module]:
    return next((getattr(module, n) for n in names if getattr(module, n, None) is not None), None)


def read_processor_config(transformers, name: str, local: bool, offline: bool) -> dict:
    """The image processor's settings (preprocessor_config.json), {} when the model has none."""
    if local:
        path = Path(name) / PROCESSOR_FILE
        path = path if path.is_file() else None
    else:
        try:
            path = transformers.utils.cached_file(name, PROCESSOR_FILE, local_files_only=offline,
                                                  _raise_exceptions_for_missing_entries=False)
        except (OSError, ValueError):
            path = None
    if path is None:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except ValueError:
        raise ConfigError(f"backbone.name={name}: {PROCESSOR_FILE} is not valid JSON ({path})") from None


def as_size(size) -> Optional[tuple[int, int]]:
    """(height, width) from the forms processor and model configs use: 224, [h, w],
    {"height", "width"}, {"shortest_edge"} (resized, then cropped square)."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        return int(size), int(size)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    return None


def processor_size(processor: dict) -> Optional[tuple[int, int]]:
    """What the model sees: the center crop when the processor crops, else the resized size."""
    if processor.get("do_center_crop") and processor.get("crop_size") is not None:
        return as_size(processor["crop_size"])
    return as_size(processor.get("size"))


def normalization(processor: dict, channels: int, name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel from the processor config; ImageNet's when it has none."""
    if not processor.get("do_normalize", True):
        return (0.0,) * channels, (1.0,) * channels
    stats = []
    for key, default in (("image_mean", IMAGENET_MEAN), ("image_std", IMAGENET_STD)):
        value = processor.get(key)
        value = default if value is None else value
        value = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * channels
        if len(value) != channels:
            raise ConfigError(f"backbone.name={name}: {PROCESSOR_FILE} {key} has {len(value)} values for a "
                              f"{channels}-channel model")
        stats.append(value)
    if not all(s > 0 for s in stats[1]):
        raise ConfigError(f"backbone.name={name}: {PROCESSOR_FILE} image_std must be > 0, got {list(stats[1])}")
    return stats[0], stats[1]
