"""Model merging: several fine-tunes of one start combined into one backbone, one file per method.

Every method is a `MergeMethod` (base.py) named `METHOD` in its own module of this package, found
by `methods()`: a new method is one file. Each works on parameter dicts (floating tensors, by
name) through the same signature,

    merge(start, finetuned: list[dict], *, stats: list[dict] | None = None, **knobs) -> dict

`start` the weights every fine-tune began from (θ₀), `finetuned` one dict per task (θₜ), `stats`
one dict per task when the method declares `statistics` ("fisher": the diagonal Fisher at θₜ;
"gram": XᵀX of each Linear layer's inputs, under its weight's name). Methods that scale a merged
task vector (`scaled=True`: task arithmetic, TIES, DARE) also give `vector(...)` = τ_m, so that
θ = θ₀ + λ·τ_m can be evaluated for every λ of a grid from one τ_m. Pure torch on state dicts
(weights.py); the command that finds runs, computes statistics and evaluates is `merge.py`.
"""

from transferlab.merging.base import Knob, MergeMethod, get, methods

__all__ = ["Knob", "MergeMethod", "get", "methods"]
