"""RegMean (Jin et al., ICLR 2023): each linear layer's weight in closed form from the Gram
matrices of its inputs, the merge that best reproduces every task model's outputs of that layer:

    W* = argmin_W Σₜ ‖Xₜ Wᵀ − Xₜ Wₜᵀ‖²   ⇒   W*ᵀ = (Σₜ G̃ₜ)⁻¹ Σₜ G̃ₜ Wₜᵀ

(PyTorch's layout: y = x Wᵀ, W of shape (out, in)), Gₜ = XₜᵀXₜ the layer's inputs on task t's
training data at task t's fine-tuned weights, and G̃ₜ = diag(Gₜ) + α·(Gₜ − diag(Gₜ)): the paper's
shrinking of the off-diagonal entries (α = 0.9 by default; α = 1 is the plain least-squares
solution, α = 0 a per-input-feature weighted mean). Solved in float64; a singular system (an input
feature that is 0 on every task) takes the least-squares (minimum-norm) solution.

Linear layers are each nn.Linear and — beyond the paper, which merges transformers — each
pointwise (1×1) convolution, a Linear over the channels at every position (its weight (out, in, 1,
1) is solved as (out, in)). Every other parameter (biases, normalization, embeddings, spatial and
depthwise convolutions, a layer without a Gram) gets the plain average, as in the paper.
"""

from __future__ import annotations

import torch

from transferlab.merging.base import Knob, MergeMethod

ALPHA = Knob("alpha", "alpha", 0.9, float, low=0.0, high=1.0,
             help="RegMean: the scale of the Gram matrices' off-diagonal entries")


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """diag(G) + α·(G − diag(G))."""
    diagonal = torch.diag(torch.diagonal(gram))
    return diagonal + alpha * (gram - diagonal)


def solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a⁻¹ b, or the least-squares solution when a is singular."""
    x, info = torch.linalg.solve_ex(a, b)
    if int(info) == 0 and torch.isfinite(x).all():
        return x
    return torch.linalg.lstsq(a, b, driver="gelsd").solution


def merge(start: dict, finetuned: list[dict], *, stats: list[dict], alpha: float = 0.9) -> dict:
    merged = {}
    for name, first in finetuned[0].items():
        if first.dim() in (2, 4) and all(name in g for g in stats):
            grams = [shrink(g[name].double(), alpha) for g in stats]
            rhs = sum(g @ theta[name].double().reshape(first.shape[0], -1).T for g, theta in zip(grams, finetuned))
            merged[name] = solve(sum(grams), rhs).T.reshape(first.shape).to(first.dtype).contiguous()
        else:
            merged[name] = (sum(theta[name].double() for theta in finetuned) / len(finetuned)).to(first.dtype)
    return merged


METHOD = MergeMethod(
    name="regmean", title="RegMean",
    formula="each Linear and 1×1 convolution: W*ᵀ = (Σₜ G̃ₜ)⁻¹ Σₜ G̃ₜ Wₜᵀ, Gₜ = XₜᵀXₜ of its inputs, "
            "off-diagonals × α; other parameters: the plain average",
    merge=merge, knobs=(ALPHA,), statistics=("gram",), order=60, reference="Jin et al. 2023")
