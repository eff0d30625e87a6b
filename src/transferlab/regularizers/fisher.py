"""Diagonal Fisher information from per-sample gradients (torch.func).

F_i = 1/N * sum_n (d loss_n / d w_i)^2, at fixed weights, in eval mode (BatchNorm statistics must
not move while we measure; avalanche PR #723). Squaring the *batch-mean* gradient instead, as
avalanche and others do, underestimates F by up to the batch size near convergence (NOTES §2) and
makes lambda mean different things at different batch sizes.

- empirical (default): the dataset's labels y_n.
- true Fisher (`sample_labels=True`): y_n drawn from the model's own softmax, seeded.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from transferlab.collectives import several_ranks, sum_across_ranks
from transferlab.tasks import evaluating, to_device


# Per-sample gradients hold samples x parameters numbers: a 256-example batch through MiniLM's
# 22.7M parameters would be 23 GB. Each batch is taken in chunks that keep them under this size
# (the same sums; a small CNN's batches stay whole).
PER_SAMPLE_GRAD_BYTES = 1 << 30


def diagonal_fisher(model: nn.Module, params: dict[str, torch.Tensor], batches: Iterable,
                    *, sample_labels: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fisher diagonal for `params` (a subset of `model.named_parameters()`, by name)."""
    weights = {name: p.detach() for name, p in params.items()}
    generator = torch.Generator().manual_seed(seed)

    def sample_loss(weights, x, y):
        # x: one example (a tensor, or a dict of tensors for text): give it a batch axis back.
        logits = functional_call(model, weights, (tree_map(lambda t: t.unsqueeze(0), x),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    fisher = {name: torch.zeros_like(w) for name, w in weights.items()}
    chunk = max(1, PER_SAMPLE_GRAD_BYTES // sum(w.numel() * w.element_size() for w in weights.values()))
    count = 0
    # Outer no_grad: torch.func.grad still differentiates inside, but records no graph through
    # the parameters it does not differentiate (the head) into the result.
    with evaluating(model) as device, torch.no_grad():  # CPU batches go to the model's device
        for batch in batches:
            x, y = to_device(batch, device)[:2]
            if sample_labels:
                probs = F.softmax(model(x), dim=-1)
                y = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(probs.device)
            for start in range(0, len(y), chunk):
                part = slice(start, start + chunk)
                grads = per_sample_grads(weights, tree_map(lambda t: t[part], x), y[part])
                for name, g in grads.items():
                    fisher[name] += g.square().sum(0)
            count += len(y)
    if several_ranks():
        # DDP: each rank saw its share of the source set; sum the squares and the counts.
        count = int(sum_across_ranks([float(count)])[0])
        for f in fisher.values():
            dist.all_reduce(f)
    if count == 0:
        raise ValueError("diagonal_fisher: no samples")
    return {name: f / count for name, f in fisher.items()}


def normalize_fisher(fisher: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    """`none`; `max`: largest entry becomes 1; `mean`: average entry becomes 1."""
    if how == "none":
        return fisher
    flat = torch.cat([f.flatten() for f in fisher.values()])
    scale = flat.max() if how == "max" else flat.mean()
    if scale <= 0:
        return fisher
    return {name: f / scale for name, f in fisher.items()}
