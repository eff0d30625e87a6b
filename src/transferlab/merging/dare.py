"""DARE (Yu et al., ICML 2024): drop and rescale each task vector, then merge.

Each entry of τₜ = θₜ − θ₀ is dropped with probability p and the survivors are multiplied by
1/(1−p), so E[τ̂ₜ] = τₜ (masks from a generator seeded with the runs' seed, drawn task by task in
task order, parameters by name). Then `combine`:
- task_arithmetic (default): θ = θ₀ + λ Σₜ τ̂ₜ (λ grid 0.1, ..., 1.0);
- ties: TIES' sign election and disjoint mean on the τ̂ₜ, DARE's random drop taking the place of
  TIES' magnitude trim (as mergekit's dare_ties): θ = θ₀ + λ τ_m (λ grid 0.8, ..., 2.5).
p = 0.9 by default (the paper: up to 0.9 and more with little loss for fine-tunes).
"""

from __future__ import annotations

import torch

from transferlab.merging import task_arithmetic, ties
from transferlab.merging.base import LAMBDA, Knob, MergeMethod
from transferlab.weights import add, task_vector

P = Knob("p", "p", 0.9, float, low=0.0, high=1.0, high_open=True,
         help="DARE: the drop probability of each task-vector entry")
COMBINE = Knob("combine", "combine", "task_arithmetic", str, choices=("task_arithmetic", "ties"),
               help="DARE: what merges the rescaled task vectors")


def drop_and_rescale(vector: dict, p: float, generator: torch.Generator) -> dict:
    """Each entry kept with probability 1−p and scaled by 1/(1−p) (p = 0: τ unchanged)."""
    out = {}
    for name in sorted(vector):
        v = vector[name]
        keep = torch.rand(v.shape, generator=generator, dtype=torch.float64) >= p
        out[name] = torch.where(keep, v.double() / (1 - p), torch.zeros((), dtype=torch.float64)).to(v.dtype)
    return {name: out[name] for name in vector}


def vector(start: dict, finetuned: list[dict], *, stats=None, p: float = 0.9, combine: str = "task_arithmetic",
           seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    rescaled = [drop_and_rescale(task_vector(start, theta), p, generator) for theta in finetuned]
    return ties.elect_and_mean(rescaled) if combine == "ties" else task_arithmetic.summed(rescaled)


def merge(start: dict, finetuned: list[dict], *, stats=None, lam: float = 1.0, p: float = 0.9,
          combine: str = "task_arithmetic", seed: int = 0) -> dict:
    return add(start, vector(start, finetuned, p=p, combine=combine, seed=seed), lam)


METHOD = MergeMethod(
    name="dare", title="DARE",
    formula="τ̂ₜ = mₜ ⊙ (θₜ − θ₀) / (1 − p), mₜ ~ Bernoulli(1 − p); then task arithmetic (θ₀ + λ Σₜ τ̂ₜ) "
            "or TIES' election and disjoint mean (combine=ties)",
    merge=merge, vector=vector, knobs=(LAMBDA, P, COMBINE), seeded=True,
    grid=lambda knobs: ties.GRID if knobs.get("combine") == "ties" else task_arithmetic.GRID, order=40,
    reference="Yu et al. 2024")
