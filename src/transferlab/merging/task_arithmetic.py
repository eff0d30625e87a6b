"""Task arithmetic (Ilharco et al., ICLR 2023): θ = θ₀ + λ Σₜ τₜ, τₜ = θₜ − θ₀, with λ chosen on
the tasks' validation sets (default grid 0.1, 0.2, ..., 1.0, as the paper's search)."""

from __future__ import annotations

from transferlab.merging.base import LAMBDA, MergeMethod, grid
from transferlab.weights import add, task_vector

GRID = grid(0.1, 1.0, 0.1)


def summed(vectors: list[dict]) -> dict:
    """Σₜ τₜ, summed in float64, kept in the vectors' dtype."""
    return {k: sum(v[k].double() for v in vectors).to(t.dtype) for k, t in vectors[0].items()}


def vector(start: dict, finetuned: list[dict], *, stats=None) -> dict:
    return summed([task_vector(start, theta) for theta in finetuned])


def merge(start: dict, finetuned: list[dict], *, stats=None, lam: float = 1.0) -> dict:
    return add(start, vector(start, finetuned), lam)


METHOD = MergeMethod(
    name="task_arithmetic", title="task arithmetic", formula="θ = θ₀ + λ Σₜ (θₜ − θ₀)",
    merge=merge, vector=vector, knobs=(LAMBDA,), grid=lambda knobs: GRID, order=20,
    reference="Ilharco et al. 2023")
