"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

1. Trim: each task vector τₜ = θₜ − θ₀ keeps its top-k% entries by magnitude, over the whole
   vector (every parameter together), the rest set to 0 → τ̂ₜ: the m = max(1, ⌊d·k/100⌋) largest
   |τ| of its d entries (entries tied with the m-th largest are kept too). The reference code keeps
   one entry more (it thresholds at the (d − m)-th smallest); the paper's top-k% is what is here.
2. Elect: γ = sign(Σₜ τ̂ₜ) per parameter (the sign of the larger total mass); where that sum is 0,
   the sign held by most entries of γ (the reference's "majority" rule).
3. Disjoint mean: τ_m = the mean of the τ̂ₜ whose sign agrees with γ (0 where none does).

θ = θ₀ + λ·τ_m, λ chosen on the tasks' validation sets (default grid 0.8, 0.9, ..., 2.5: the
reference's search), k = 20 by default.
"""

from __future__ import annotations

import torch

from transferlab.merging.base import LAMBDA, Knob, MergeMethod, grid
from transferlab.weights import add, task_vector

GRID = grid(0.8, 2.5, 0.1)
K = Knob("k", "k", 20.0, float, low=0.0, high=100.0, low_open=True,
         help="TIES: the percent of each task vector's entries kept, by magnitude")


def trim(vector: dict, k: float) -> dict:
    """τ with only its top-k% entries by magnitude (over all its tensors together)."""
    magnitudes = torch.cat([v.abs().flatten() for v in vector.values()])
    d = magnitudes.numel()
    kept = max(1, int(d * k / 100))
    if kept >= d:
        return dict(vector)
    threshold = magnitudes.kthvalue(d - kept + 1).values  # the kept-th largest |τ|
    return {name: torch.where(v.abs() >= threshold, v, torch.zeros_like(v)) for name, v in vector.items()}


def elect_and_mean(vectors: list[dict]) -> dict:
    """Steps 2 and 3: the sign by total mass, then the mean of the entries that agree with it."""
    signs = {name: torch.sign(sum(v[name].double() for v in vectors)) for name in vectors[0]}
    majority = torch.sign(sum(s.sum() for s in signs.values()))  # for entries whose sum is 0
    merged = {}
    for name, sign in signs.items():
        sign = torch.where(sign == 0, majority, sign)
        stacked = torch.stack([v[name].double() for v in vectors])
        agree = torch.where(sign > 0, stacked > 0, stacked < 0)
        count = agree.sum(0).clamp(min=1)
        merged[name] = ((stacked * agree).sum(0) / count).to(vectors[0][name].dtype)
    return merged


def vector(start: dict, finetuned: list[dict], *, stats=None, k: float = 20.0) -> dict:
    return elect_and_mean([trim(task_vector(start, theta), k) for theta in finetuned])


def merge(start: dict, finetuned: list[dict], *, stats=None, lam: float = 1.0, k: float = 20.0) -> dict:
    return add(start, vector(start, finetuned, k=k), lam)


METHOD = MergeMethod(
    name="ties", title="TIES",
    formula="τ̂ₜ = top-k% of θₜ − θ₀ by magnitude; γ = sign(Σₜ τ̂ₜ); τ_m = mean of the τ̂ₜ agreeing with γ; "
            "θ = θ₀ + λ τ_m",
    merge=merge, vector=vector, knobs=(LAMBDA, K), grid=lambda knobs: GRID, order=30,
    reference="Yadav et al. 2023")
