"""Frozen blocks computed once (issue 13, part 2).

When blocks 0..k-1 do not train for a whole target stage (linear probe, `partial`, ...), they run
in eval mode with fixed weights (TaskModule puts frozen blocks in eval mode), so block k-1's output
for an example is the same in every epoch. `frozen_prefix_stage` computes it once for the train
and validation splits and returns what the stage then trains instead: a TaskModule over the same
blocks and head whose backbone starts at block k (`FromBlock`: the backbone's `forward_from(k)`),
and splits whose x is the cached output (`forward_intermediates`, stopped at block k-1; for text:
the hidden states, with the attention mask travelling beside them).

Automatic only where exact; otherwise it returns None and the stage runs as before:
- k >= 1 (policies that train some of every block, BitFit and LoRA, freeze no whole block);
- full precision (under autocast the prefix would run in bf16/fp16 inside the stage);
- the backbone's parameters all live in its blocks (so penalties and param groups see the same
  list), and the cache fits in CACHE_LIMIT_BYTES;
- a check on the first training examples: the cached path gives the full model's outputs.
Dropout inside the frozen blocks is off either way (eval mode); BatchNorm uses its running
statistics either way; the random numbers drawn by the blocks that train are the same, as frozen
blocks draw none. Penalties on frozen parameters are zero in both (they get no gradient).

When every block is frozen (a linear probe) the cached value is the pooled feature itself (for
a classification task; a token task keeps the last block's per-token output), so the stage trains
the head on (N, d) features.

Scope: in memory for the stage, and — when the stage is given the stage cache — on disk for every
job of a sweep that starts from the same blocks: the key is a digest of the frozen blocks' weights
and buffers and of the train / validation inputs (plus k, the device type, the precision and the
torch version), so it matches exactly when the outputs would be recomputed the same, whatever the
source stage or seed that produced those weights. The test split is not cached (it is evaluated
once, by the full model, after the stage). The stage checkpoint holds the same state_dict keys
either way (FromBlock names its modules as the backbone does), so a resumed run takes the cache
again and continues. Weight-space methods that interpolate the whole backbone afterwards (WiSE-FT)
see the same weights: frozen blocks are identical before and after the stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import torch
from torch import nn

from transferlab.data.loaders import EVAL_BATCH
from transferlab.stages.module import TaskModule
from transferlab.tasks import evaluating, to_device

log = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = 4 << 30  # cached block outputs of train + val; beyond this, no cache
FULL_PRECISION = ("32", "32-true", "64", "64-true")
CHECK_EXAMPLES = 8


def frozen_prefix_length(always_frozen: set[int]) -> int:
    """k: blocks 0..k-1 are frozen in every epoch (only a prefix counts)."""
    k = 0
    while k in always_frozen:
        k += 1
    return k


class FromBlock(nn.Module):
    """The backbone from block k on (`forward_from`): reads block k's input — block k-1's output,
    for text with its attention mask. Holds the backbone's own children under the same names, so
    its parameters, param groups and state_dict keys are the backbone's."""

    def __init__(self, backbone: nn.Module, k: int, pooled: bool = False):
        super().__init__()
        for name, child in backbone.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "backbone", backbone)  # a view: its modules are registered above
        if "blocks" not in self._modules:  # a decoder's blocks are a view of its model's modules
            object.__setattr__(self, "blocks", backbone.blocks)
        self.k, self.feature_dim = k, backbone.feature_dim
        self.pooled = pooled  # x is already the backbone's output (every block frozen)

    def forward(self, x) -> torch.Tensor:
        return x if self.pooled else self.backbone.forward_from(self.k, x)

    def token_features(self, x) -> torch.Tensor:
        return self.backbone.forward_from(self.k, x, pool=False)


class CachedTokens:
    """Block outputs of N texts (N, L, D) with their attention mask; a batch is cut to its longest
    text, as data/text.Tokens cuts token ids, so TokenLabels' columns still line up."""

    def __init__(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        self.hidden, self.attention_mask = hidden, attention_mask

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        mask = self.attention_mask[index]
        used = mask.any(0)
        return {"hidden": self.hidden[index][:, used], "attention_mask": mask[:, used]}


@torch.no_grad()
def block_output(backbone: nn.Module, k: int, x) -> torch.Tensor:
    """Block k-1's output for batch x: the pass stops there."""
    return backbone.forward_intermediates(x, [k - 1], stop_early=True)[1][0]


@torch.no_grad()
def cache_split(backbone: nn.Module, k: int, split: tuple, device: torch.device, text: bool, pooled: bool):
    """Block k-1's output (pooled: the backbone's output) for every example of the split, in order:
    a tensor, or for text blocks {"hidden", "attention_mask"} at the split's width."""
    x, y = split
    outputs = []
    for start in range(0, len(y), EVAL_BATCH):
        index = list(range(start, min(start + EVAL_BATCH, len(y))))
        batch = x[index]
        batch = {n: t.to(device) for n, t in batch.items()} if text else batch.to(device)
        out = backbone(batch) if pooled else block_output(backbone, k, batch)
        outputs.append(out.cpu())
    if pooled or not text:
        return torch.cat(outputs)
    # each batch was cut to the columns its texts use: back into the split's columns (the rest
    # is padding, masked)
    mask = x.attention_mask
    hidden = torch.zeros(len(y), mask.shape[1], outputs[0].shape[-1], dtype=outputs[0].dtype)
    for start, out in zip(range(0, len(y), EVAL_BATCH), outputs):
        rows = slice(start, start + len(out))
        hidden[rows, mask[rows].any(0)] = out
    return {"hidden": hidden, "attention_mask": mask}


def as_inputs(cached):
    return CachedTokens(cached["hidden"], cached["attention_mask"]) if isinstance(cached, dict) else cached


def digest(tensors) -> str:
    """sha256 over tensors' dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        t = t.detach().cpu().contiguous().reshape(-1)  # 1-d: a 0-d tensor cannot be viewed as bytes
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_settings(cfg, backbone: nn.Module, k: int, pooled: bool, task, text: bool, device: torch.device) -> dict:
    """The stage-cache key of the block outputs: exactly what they are computed from."""
    def inputs(split) -> str:
        identity = getattr(split[0], "identity", None)  # images on disk: their dataset, rows and size
        if identity is not None:
            return identity
        return digest([split[0].input_ids, split[0].attention_mask] if text else [split[0]])
    weights = [t for block in backbone.blocks[:k] for t in block.state_dict().values()]
    return {"k": k, "pooled": pooled, "pooling": getattr(backbone, "pooling", None) if pooled else None,
            "backbone": type(backbone).__name__, "blocks": digest(weights),
            "train": inputs(task.train), "val": inputs(task.val), "eval_batch": EVAL_BATCH,
            "device": device.type, "precision": str(cfg.trainer.precision), "torch": torch.__version__}


def frozen_prefix_stage(cfg, module: TaskModule, task, always_frozen: set[int], device: torch.device, methods=(),
                        cache=None):
    """(module, task, hit) to train on instead, reading block k-1's cached output; None when the
    cache would not be exact (see the module docstring). `module` is the stage's TaskModule,
    `methods` the stage's methods (one whose loss term reads the raw batch, like DELTA's, rules it
    out). `cache`: the stage cache (cache.StageCache) or None; hit is None without one."""
    backbone, k = module.backbone, frozen_prefix_length(always_frozen)
    text = backbone.reads_text
    pooled = k == len(backbone.blocks) and not module.task.token_level
    reason = None
    if k == 0:
        return None
    raw = [m.name for m in methods if m.reads_raw_inputs or m.reads_blocks(backbone)]
    if raw:
        reason = f"regularizer={raw[0]} reads the raw batch or inner block outputs"
    elif cfg.data.augment:
        reason = "data.augment draws new inputs every epoch"
    elif str(cfg.trainer.precision) not in FULL_PRECISION:
        reason = f"trainer.precision={cfg.trainer.precision} (the blocks would run under autocast)"
    suffix = FromBlock(backbone, k, pooled)
    if reason is None and [id(p) for p in suffix.parameters()] != [id(p) for p in backbone.parameters()]:
        reason = "the backbone has parameters outside its blocks"
    if reason is None:
        module.to(device)
        width = task.train[0].attention_mask.shape[1] if text else None
        per_example = block_bytes(backbone, k, task.train, device, text, width, pooled)
        if per_example * (len(task.train[1]) + len(task.val[1])) > CACHE_LIMIT_BYTES:
            reason = f"the cache would exceed {CACHE_LIMIT_BYTES >> 30} GiB"
    if reason is not None:
        log.info("target stage: frozen blocks 0..%d run every epoch: %s", k - 1, reason)
        return None

    def compute() -> dict:
        with evaluating(module):
            return {name: cache_split(backbone, k, getattr(task, name), device, text, pooled) for name in ("train", "val")}

    if cache is None:
        outputs, hit = compute(), None
    else:
        outputs, hit = cache.fetch_tensors("frozen_blocks", cache_settings(cfg, backbone, k, pooled, task, text, device),
                                           compute)
    splits = {name: (as_inputs(outputs[name]), getattr(task, name)[1]) for name in ("train", "val")}
    cached = TaskModule(suffix, module.head, stage=module.stage, task=module.task, lr=module.lr,
                        weight_decay=module.weight_decay, lr_scales=module.lr_scales, optimizer=module.make_optimizer,
                        scheduler=module.make_scheduler, methods=methods, context=module.context)
    if not same_outputs(module, cached, task.train, splits["train"], device):
        log.info("target stage: frozen blocks 0..%d run every epoch: the cached path differs", k - 1)
        return None
    log.info("target stage: blocks 0..%d frozen for the whole stage: their output computed once%s", k - 1,
             {True: " (taken from the stage cache)", False: " (kept in the stage cache)", None: ""}[hit])
    return cached, dataclasses.replace(task, **splits), hit


def block_bytes(backbone, k: int, split: tuple, device, text: bool, width: int | None, pooled: bool = False) -> int:
    """Bytes of one example's cached output (text: at the split's full width)."""
    if pooled:
        return backbone.feature_dim * torch.finfo(torch.get_default_dtype()).bits // 8
    x = split[0][[0]]
    x = {n: t.to(device) for n, t in x.items()} if text else x.to(device)
    was_training = backbone.training
    backbone.eval()
    try:
        out = block_output(backbone, k, x)
    finally:
        backbone.train(was_training)
    per_position = out[0].numel() // (out.shape[1] if text else 1)
    return per_position * (width if text else 1) * out.element_size()


@torch.no_grad()
def same_outputs(full: TaskModule, cached: TaskModule, split: tuple, cached_split: tuple, device) -> bool:
    index = list(range(min(CHECK_EXAMPLES, len(split[1]))))
    with evaluating(full):
        want = full(to_device((split[0][index], split[1][index]), device)[0])
        got = cached(to_device((cached_split[0][index], cached_split[1][index]), device)[0])
    return want.shape == got.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
