"""The plain average of the fine-tuned weights (a uniform soup of fine-tunes of different tasks):
θ = (1/T) Σₜ θₜ. Task arithmetic with λ = 1/T gives the same weights."""

from __future__ import annotations

from transferlab.merging.base import MergeMethod
from transferlab.weights import average


def merge(start: dict, finetuned: list[dict], *, stats=None) -> dict:
    return average(finetuned)


METHOD = MergeMethod(
    name="uniform", title="uniform (plain average)", formula="θ = (1/T) Σₜ θₜ (float64 sum; the uniform soup)",
    merge=merge, order=10, reference="Wortsman et al. 2022 (model soups)")
