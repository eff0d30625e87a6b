"""Weight arithmetic on state dicts: the one room WiSE-FT, model soups and model merging share.

A state dict here is a plain {name: tensor} mapping (a module's `state_dict()`, or part of one).
Floating-point tensors take part in the arithmetic; integer tensors (BatchNorm's
`num_batches_tracked`) are carried over from one of the inputs, as each function says. Pure torch:
nothing here knows about runs, configs or tasks.

- `interpolate(start, tuned, α)`: (1−α)·start + α·tuned (WiSE-FT);
- `average(states)`: the mean, summed in float64 (a uniform soup; the plain-average merge);
- `task_vector(start, tuned)`: τ = tuned − start (task arithmetic, TIES, DARE);
- `add(start, vector, λ)`: start + λ·τ;
- `fold_lora(state, scaling)`: a peft-LoRA state dict as plain weights, W = W₀ + scaling·B A;
- `state_digest(state)`, `start_digest(state)`: content digests (the identity of a start).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


def interpolate(start: State, tuned: State, alpha: float) -> dict:
    """(1-α)·start + α·tuned, written so that α = 1 gives `tuned` and α = 0 `start` exactly.
    Integer tensors come from `tuned`."""
    return {k: ((1 - alpha) * start[k] + alpha * v) if v.is_floating_point() else v for k, v in tuned.items()}


def average(states: Sequence[State]) -> dict:
    """The mean of state dicts (floating tensors, summed in float64 — so a soup of identical
    ingredients is that ingredient exactly; integer counters from the first)."""
    return {k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}


def vector_dtype(dtype: torch.dtype) -> torch.dtype:
    """Task vectors are kept in at least float32 (a bf16 difference would lose most of its bits)."""
    return torch.promote_types(dtype, torch.float32)


def task_vector(start: State, tuned: State) -> dict:
    """τ = tuned − start, for every floating tensor of `tuned` (computed in float64, kept in at
    least float32). Integer tensors are not part of a task vector."""
    return {k: (v.double() - start[k].double()).to(vector_dtype(v.dtype)) for k, v in tuned.items()
            if v.is_floating_point()}


def add(start: State, vector: State, scale: float = 1.0) -> dict:
    """start + scale·vector (in float64, cast back to start's dtype); tensors the vector does
    not hold, and integer tensors, are start's."""
    return {k: (v.double() + scale * vector[k].double()).to(v.dtype) if k in vector and v.is_floating_point() else v
            for k, v in start.items()}


def floating(state: State, names: Iterable[str] | None = None) -> dict:
    """The floating tensors of `state` (of `names` only, when given)."""
    keep = None if names is None else set(names)
    return {k: v for k, v in state.items() if v.is_floating_point() and (keep is None or k in keep)}


# -- LoRA ---------------------------------------------------------------------------------------
LORA_MARKS = ("lora_A", "lora_B")
UNSUPPORTED_LORA = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def has_adapters(state: State) -> bool:
    return any(f".{mark}." in k for k in state for mark in LORA_MARKS)


def fold_lora(state: State, scaling: float, transposed: Iterable[str] = ()) -> dict:
    """A state dict with peft LoRA adapters (`<m>.base_layer.weight`, `<m>.lora_A.<name>.weight`,
    `<m>.lora_B.<name>.weight`) as the plain module's weights: `<m>.weight` = W₀ + scaling·B A
    (computed in float64), `<m>.base_layer.bias` → `<m>.bias`; keys without adapters unchanged.
    `scaling` is peft's lora_alpha / r. Modules in `transposed` (transformers' Conv1D, stored
    (in, out): peft's fan_in_fan_out) get (B A)ᵀ. With B = 0 (as peft initializes it) this is the
    base model exactly, and so is `scaling` = 0 (`base_weights`)."""
    transposed = set(transposed)
    unsupported = [k for k in state if any(f".{mark}." in k or k.endswith(f".{mark}") for mark in UNSUPPORTED_LORA)]
    if unsupported:
        raise ValueError(f"fold_lora: {unsupported[0]}: only LoRA on Linear layers (lora_A / lora_B) can be folded")
    adapters: dict[str, dict[str, torch.Tensor]] = {}  # module path → {"A": ..., "B": ...}
    names: dict[str, set[str]] = {}
    plain = {}
    for key, value in state.items():
        for mark in LORA_MARKS:
            head, sep, tail = key.partition(f".{mark}.")
            if sep:
                adapter, _, _ = tail.partition(".")
                adapters.setdefault(head, {})[mark[-1]] = value
                names.setdefault(head, set()).add(adapter)
                break
        else:
            plain[key] = value
    several = [path for path, found in names.items() if len(found) > 1]
    if several:
        raise ValueError(f"fold_lora: {several[0]} holds {len(names[several[0]])} adapters "
                         f"({', '.join(sorted(names[several[0]]))}); one adapter per layer can be folded")
    folded = {}
    for key, value in plain.items():
        path, sep, attr = key.rpartition(".base_layer.")
        if not sep or path not in adapters:
            folded[key] = value
            continue
        if attr == "weight" and scaling != 0:
            parts = adapters[path]
            if set(parts) != {"A", "B"}:
                raise ValueError(f"fold_lora: {path} has lora_{next(iter(parts))} without its pair")
            delta = scaling * (parts["B"].double() @ parts["A"].double())
            if path in transposed:
                delta = delta.T
            if delta.shape != value.shape:
                raise ValueError(f"fold_lora: {path}: B·A is {tuple(delta.shape)}, its weight {tuple(value.shape)}")
            value = (value.double() + delta).to(value.dtype)
        folded[f"{path}.{attr}"] = value
    missing = [path for path in adapters if f"{path}.weight" not in folded]
    if missing:
        raise ValueError(f"fold_lora: {missing[0]} has adapters but no base_layer.weight")
    return folded


def base_weights(state: State) -> dict:
    """The weights under any peft adapters: `<m>.base_layer.<p>` → `<m>.<p>`, every other entry of
    an adapted module `<m>` (LoRA's A / B, DoRA's magnitudes, IA3's vectors) dropped — for LoRA
    exactly `fold_lora(state, 0.0)`; a state dict without adapters as it is."""
    adapted = {k.rpartition(".base_layer.")[0] for k in state if ".base_layer." in k}
    if not adapted:
        return dict(state)
    out = {}
    for key, value in state.items():
        path, sep, attr = key.rpartition(".base_layer.")
        if sep and path in adapted:
            out[f"{path}.{attr}"] = value
        elif not any(key.startswith(p + ".") for p in adapted):
            out[key] = value
    return out


# -- identity -----------------------------------------------------------------------------------
def start_digest(state: State) -> str:
    """The identity of the weights a target stage starts from: the digest of its base weights
    (LoRA's adapters start at ΔW = 0, so a LoRA start is its base)."""
    return state_digest(base_weights(state))


def state_digest(state: State) -> str:
    """sha256 of the tensors' names, dtypes, shapes and bytes (sorted by name): equal digests,
    equal weights."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
