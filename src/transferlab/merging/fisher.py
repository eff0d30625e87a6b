"""Fisher merging (Matena & Raffel, NeurIPS 2022): each parameter the Fisher-weighted mean of the
fine-tuned values,

    θ = Σₜ Fₜ θₜ / Σₜ Fₜ

with Fₜ the diagonal Fisher of task t's model (the merged backbone's parameters, under the task's
own head) at its fine-tuned weights. The command computes it with the project's exact per-example
Fisher (regularizers/fisher.py) on the task's first `examples` training examples: by default the
true Fisher of the paper, one label per example drawn from the model's softmax (seeded with the
run's seed); fisher_labels=empirical uses the data's labels instead. As the paper's code, each Fₜ
is floored at `floor` (1e-6 by default), so a parameter no task's loss moves gets the plain
average; equal Fishers give the plain average. Task weights are uniform (the paper's λₜ = 1/T,
which cancels). A parameter no Fisher covers gets the plain average too.
"""

from __future__ import annotations

from transferlab.merging.base import Knob, MergeMethod

FLOOR = Knob("floor", "floor", 1e-6, float, low=0.0, low_open=True,
             help="Fisher merging: the smallest Fisher value used")


def merge(start: dict, finetuned: list[dict], *, stats: list[dict], floor: float = 1e-6) -> dict:
    merged = {}
    for name, first in finetuned[0].items():
        if all(name in f for f in stats):
            weights = [f[name].double().clamp(min=floor) for f in stats]
            total = sum(w * theta[name].double() for w, theta in zip(weights, finetuned))
            merged[name] = (total / sum(weights)).to(first.dtype)
        else:
            merged[name] = (sum(theta[name].double() for theta in finetuned) / len(finetuned)).to(first.dtype)
    return merged


METHOD = MergeMethod(
    name="fisher", title="Fisher merging",
    formula="θ = Σₜ Fₜ θₜ / Σₜ Fₜ, Fₜ the diagonal Fisher at θₜ (floored)",
    merge=merge, knobs=(FLOOR,), statistics=("fisher",), order=50, reference="Matena & Raffel 2022")
