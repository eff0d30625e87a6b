"""Weight-space diagnostics of one fine-tuning run: *where* the target stage moved the backbone.

`weight_diagnostics(backbone, start_state, batches)` compares the backbone as it is now (the end
of the target stage, the kept best-val weights) with `start_state` (its state dict when the
target stage started: `MethodContext.start_weights`) and returns, for each block j of
`backbone.blocks`:

- ``diagnostics/block{j}_rel_change``: ‖θ − θ₀‖ / ‖θ₀‖ over the block's floating-point
  *parameters* (buffers such as BatchNorm's running statistics are not weights and are left out),
  the norms taken over all of them together (the Frobenius norm of the concatenation). Null when
  ‖θ₀‖ = 0.
- ``diagnostics/block{j}_eff_rank``: the effective rank of each weight matrix's change
  ΔW = W − W₀, averaged (mean) over the block's matrices that changed. The effective rank is the
  entropy effective rank of Roy & Vetterli (2007): erank(ΔW) = exp(H(p)), p_i = σ_i / Σσ, with σ
  the singular values of ΔW and H the Shannon entropy in nats — 1 for a rank-1 change, n for a
  change with n equal singular values (e.g. the n × n identity), and never above the rank.
  Matrices are the parameters with ≥ 2 dimensions, reshaped to (out, rest): a conv weight
  (out, in, k, k) as (out, in·k·k). A block whose matrices all stayed put gets 0 (its change has
  rank 0); a block with no matrix (a norm, BatchNorm only) gets null. Left out, with reasons:
  embedding tables (`nn.Embedding` weights): they are lookup tables, not linear maps, and the rank
  of their change counts the tokens the target data happened to contain (and SmolLM2's is
  49,152 × 576); any matrix with more than `max_matrix_elements` entries (2^24 by default; none
  of MiniLM's or the CNN's comes near), which keeps the cost bounded on large language models.
- ``diagnostics/block{j}_cka``: linear CKA (Kornblith et al., ICML 2019) between the block's
  output under the start and under the fine-tuned weights, on the first `max_examples` examples
  of `batches` (the target validation split, in order), both in eval mode:
  CKA(X, Y) = ‖Ỹᵀ X̃‖²_F / (‖X̃ᵀ X̃‖_F ‖Ỹᵀ Ỹ‖_F), X̃, Ỹ column-centred (n × p) —
  computed as ⟨K̃, L̃⟩_F / (‖K̃‖_F ‖L̃‖_F) with K̃ = X̃X̃ᵀ, L̃ = ỸỸᵀ, the same number
  (= HSIC(K, L) / √(HSIC(K, K) HSIC(L, L)) with H the centring matrix). 1 = the block's representation is the
  start's up to rotation and scale. Null when a representation is constant on those examples.
- ``diagnostics/features_cka``: the same for the backbone's output (`backbone(x)`, what a head
  reads), and ``diagnostics/total_rel_change`` ‖θ − θ₀‖ / ‖θ₀‖ over every floating-point
  parameter of the backbone.

**How block outputs are read.** `backbone.forward_intermediates` returns every block's output
in two forward passes of the same batch: one with the backbone's own weights, one with
`start_state` substituted through `torch.func.functional_call` (the backbone is never modified, so
nothing here can leave the run's model in another state). Every backbone has that API, so there
is no per-backbone code here.
A block's output is reduced to one
vector per example: for text, (N, L, d) token states are averaged over the real tokens (the
attention mask); otherwise flattened, and when that is wider than `MAX_FEATURES` (4,096)
image maps (N, C, H, W) are average-pooled to the finest grid that fits and token maps (N, T, d)
averaged over tokens — so memory stays n × 4,096 floats per block and pass.

**LoRA.** A peft-adapted backbone's weights are compared as merged weights: both states are folded
with `weights.fold_lora` (W = W₀ + scaling·B A, peft's scaling read from the adapted modules, and
transposed for fan_in_fan_out layers), so a LoRA run's change is ΔW = scaling·B A, the change it
made to the function, of rank ≤ r. The functional pass uses the adapters as they are (the start's
B = 0).

**Never fails a run.** The weight part and the CKA part each catch any exception; what failed is
reported as nulls and one logged warning, so the caller needs no try/except. The result always
holds every key (floats or None): null means "not measured", never 0.

Cost (CPU seconds, 1 thread, 2026-12-06, on cores shared with a study): the small CNN on digits
(channels [8, 16] / [32, 64], 256 validation images) 0.005 / 0.014 s; MiniLM-L6 (every weight
moved, 256 texts of ≤ 64 tokens) 5.4 s — 0.45 s for the weights (rel. change over 22.6M
parameters + 36 eigendecompositions of 384 × 384 Gram matrices), 4.8 s for CKA, i.e. the two
forward passes (one eval pass over the 256 texts: 2.5 s) — about 0.4 of one validation epoch of
experiment=tweets_sentiment. Memory: one float32 n × ≤ 4,096 matrix per block and pass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from transferlab.weights import LORA_MARKS, fold_lora, has_adapters

log = logging.getLogger(__name__)

PREFIX = "diagnostics/"
MAX_FEATURES = 4096  # per example and block, for CKA (see the module docstring)
MAX_MATRIX_ELEMENTS = 2 ** 24


# -- the definitions ------------------------------------------------------------------------------
def effective_rank(matrix: torch.Tensor) -> float:
    """exp(H(p)), p = σ / Σσ (Roy & Vetterli, 2007) of `matrix` reshaped to (rows, rest); 0 for a
    zero matrix. σ² are the eigenvalues of the smaller Gram matrix (M Mᵀ or Mᵀ M), in float64:
    2-4× quicker than an SVD of M on 2 cores. Its rounding puts a zero singular value at up to
    ~1e-8 σ_max (a rank-1 matrix measures 1 + O(1e-6)), below the rounding of the float32 weights
    that ΔW is the difference of."""
    m = matrix.detach().reshape(matrix.shape[0], -1).double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    sigma = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> Optional[float]:
    """Linear CKA of two representations of the same n examples, (n, p) and (n, q), through the
    centred Gram matrices (n × n); None when either is constant over the examples."""
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    k, l = x @ x.T, y @ y.T
    denominator = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l)
    if not denominator > 0:
        return None
    return min(1.0, float((k * l).sum() / denominator))  # ≤ 1 by Cauchy–Schwarz: clips rounding only


# -- the weights --------------------------------------------------------------------------------
def lora_folding(backbone: nn.Module) -> tuple[float, list[str]]:
    """(scaling, transposed module paths) of the peft LoRA layers in `backbone` (one scaling: one
    adapter config, as freeze=lora injects)."""
    scalings, transposed = set(), []
    for path, module in backbone.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and hasattr(module, "lora_A"):
            scalings.update(float(s) for s in scaling.values())
            if getattr(module, "fan_in_fan_out", False):
                transposed.append(path)
    if len(scalings) != 1:
        raise ValueError(f"LoRA adapters with {len(scalings)} scalings ({sorted(scalings)}); one can be folded")
    return scalings.pop(), transposed


def merged_name(name: str) -> Optional[str]:
    """A parameter's name after `fold_lora` (None: an adapter, folded into its layer's weight)."""
    if any(f".{mark}." in name for mark in LORA_MARKS):
        return None
    head, sep, attr = name.rpartition(".base_layer.")
    return f"{head}.{attr}" if sep else name


def block_parameter_names(backbone: nn.Module, blocks) -> list[list[str]]:
    """The (merged) state-dict names of each block's parameters. Names come from the backbone's
    registered modules, so a decoder's `blocks` view maps to its `model.<...>` names."""
    names = {}
    for name, p in backbone.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    out = []
    for block in blocks:
        found = [merged_name(names[id(p)]) for p in block.parameters() if id(p) in names]
        out.append(sorted({n for n in found if n is not None}))
    return out


def squared_norms(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                  names: Iterable[str]) -> dict[str, tuple[float, float]]:
    """{name: (‖θ − θ₀‖², ‖θ₀‖²)} of the named floating tensors, accumulated in float64."""
    out = {}
    for name in names:
        w, w0 = end[name].detach(), start[name]
        if not w.is_floating_point():
            continue
        w0 = w0.to(w.device, w.dtype)
        out[name] = (float(torch.linalg.vector_norm(w - w0, dtype=torch.float64)) ** 2,
                     float(torch.linalg.vector_norm(w0, dtype=torch.float64)) ** 2)
    return out


def relative_change(norms: Mapping[str, tuple[float, float]], names: Iterable[str]) -> Optional[float]:
    """‖θ − θ₀‖ / ‖θ₀‖ over the named tensors together; None when ‖θ₀‖ = 0."""
    moved = sum(norms[n][0] for n in names if n in norms)
    base = sum(norms[n][1] for n in names if n in norms)
    return math.sqrt(moved / base) if base > 0 else None


def weight_measures(backbone: nn.Module, start_state: Mapping[str, torch.Tensor], blocks,
                    max_matrix_elements: int) -> dict[str, Optional[float]]:
    end = {k: v.detach() for k, v in backbone.state_dict().items()}
    start = dict(start_state)
    if has_adapters(end) or has_adapters(start):
        scaling, transposed = lora_folding(backbone)
        end, start = fold_lora(end, scaling, transposed), fold_lora(start, scaling, transposed)
    params = sorted({merged_name(n) for n, _ in backbone.named_parameters(remove_duplicate=False)} - {None})
    missing = [n for n in params if n not in start or n not in end]
    if missing:
        raise KeyError(f"start_state has no {missing[0]} (and {len(missing) - 1} more)")
    embeddings = {f"{path}.weight" for path, m in backbone.named_modules() if isinstance(m, nn.Embedding)}
    norms = squared_norms(start, end, params)
    out = {f"{PREFIX}total_rel_change": relative_change(norms, params)}
    for j, names in enumerate(block_parameter_names(backbone, blocks)):
        out[f"{PREFIX}block{j}_rel_change"] = relative_change(norms, names)
        ranks = []
        for name in names:
            w, w0 = end[name], start[name]
            if (w.ndim < 2 or not w.is_floating_point() or name in embeddings
                    or w.numel() > max_matrix_elements):
                continue
            if not norms[name][0] > 0:
                ranks.append(None)  # did not move
                continue
            ranks.append(effective_rank(w.double() - w0.to(w.device).double()))
        moved = [r for r in ranks if r is not None]
        out[f"{PREFIX}block{j}_eff_rank"] = (sum(moved) / len(moved) if moved else 0.0) if ranks else None
    return out


# -- the representations -------------------------------------------------------------------------
class Intermediates(nn.Module):
    """backbone.forward_intermediates as a module's forward (what functional_call runs)."""

    def __init__(self, backbone: nn.Module, indices: list[int]):
        super().__init__()
        self.backbone, self.indices = backbone, indices

    def forward(self, x):
        return self.backbone.forward_intermediates(x, self.indices)


def example_vectors(output: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, …) → (N, features) float32, a copy (see the module docstring)."""
    out = output.detach()
    if mask is not None and out.ndim == 3 and tuple(out.shape[:2]) == tuple(mask.shape):
        weights = mask.to(out.device, torch.float32).unsqueeze(-1)
        return (out.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    if out[0].numel() > MAX_FEATURES:
        if out.ndim == 4:
            channels, (h, w) = out.shape[1], out.shape[2:]
            side = max(1, int(math.sqrt(MAX_FEATURES / channels)))
            out = nn.functional.adaptive_avg_pool2d(out.float(), (min(side, h), min(side, w)))
        elif out.ndim == 3:
            out = out.float().mean(1)
    return out.reshape(len(out), -1).to(torch.float32, copy=True)


def batch_input(batch: Any) -> Any:
    """x of a loader's batch — (x, y) or (x, y, index) — or the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def move(x: Any, device: torch.device) -> Any:
    if isinstance(x, Mapping):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def cut(x: Any, n: int) -> Any:
    if isinstance(x, Mapping):
        return {k: v[:n] for k, v in x.items()}
    return x[:n]


def batch_size(x: Any) -> int:
    return len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)


@torch.no_grad()
def representation_measures(backbone: nn.Module, start_state: Mapping[str, torch.Tensor], blocks,
                            batches: Iterable, max_examples: int) -> dict[str, Optional[float]]:
    device = next(iter(backbone.parameters())).device  # inputs go where the backbone is
    present = backbone.state_dict()
    missing = [k for k in present if k not in start_state]
    if missing:
        raise KeyError(f"start_state has no {missing[0]} (and {len(missing) - 1} more)")
    # the start weights through functional_call on a module whose forward returns every block's output
    everything = Intermediates(backbone, list(range(len(blocks))))
    start = {f"backbone.{k}": start_state[k].to(device) for k in present}
    features: dict[str, dict[Any, list[torch.Tensor]]] = {"end": {}, "start": {}}
    modes = {m: m.training for m in backbone.modules()}
    seen = 0
    try:
        backbone.eval()
        for batch in batches:
            if seen >= max_examples:
                break
            x = batch_input(batch)
            x = move(cut(x, max_examples - seen), device)
            mask = x.get("attention_mask") if isinstance(x, Mapping) else None
            for which in ("end", "start"):
                out, inner = everything(x) if which == "end" else torch.func.functional_call(everything, start, (x,))
                vectors = {j: example_vectors(o, mask) for j, o in enumerate(inner)}
                vectors["features"] = example_vectors(out, None)
                for key, value in vectors.items():
                    features[which].setdefault(key, []).append(value)
            seen += batch_size(x)
    finally:
        for m, training in modes.items():
            m.training = training
    result = {f"{PREFIX}block{j}_cka": None for j in range(len(blocks))}
    result[f"{PREFIX}features_cka"] = None
    for key, ends in features["end"].items():
        starts = features["start"].get(key)
        if starts is None or len(starts) != len(ends):  # a block run in one pass only: not comparable
            continue
        value = linear_cka(torch.cat(starts), torch.cat(ends)) if seen > 1 else None
        result[f"{PREFIX}features_cka" if key == "features" else f"{PREFIX}block{key}_cka"] = value
    return result


# -- the one entry point --------------------------------------------------------------------------
def weight_diagnostics(backbone: nn.Module, start_state: Mapping[str, torch.Tensor],
                       batches: Optional[Iterable] = None, *, max_examples: int = 256,
                       max_matrix_elements: int = MAX_MATRIX_ELEMENTS) -> dict[str, Optional[float]]:
    """Per-block relative change, effective rank of the change and CKA of start vs fine-tuned
    outputs (see the module docstring), as ``diagnostics/...`` keys, every one present (None: not
    measured). `start_state`: the backbone's state dict when the target stage started
    (`MethodContext.start_weights`; same names as `backbone.state_dict()`). `batches`: what the
    representations are compared on — a loader of the target validation split (batches (x, y) or
    x, moved to the backbone's device; the first `max_examples` examples are used); None: no CKA.
    Never raises: a failure is logged once as a warning and its quantities are None; a non-finite
    value (a run whose weights diverged) is None too."""
    failures = []
    try:
        blocks = list(backbone.blocks)
    except Exception as e:  # noqa: BLE001  no measurement may fail a run
        blocks = []
        failures.append(f"blocks: {type(e).__name__}: {e}")
    out: dict[str, Optional[float]] = {f"{PREFIX}total_rel_change": None, f"{PREFIX}features_cka": None}
    for j in range(len(blocks)):
        out.update({f"{PREFIX}block{j}_{key}": None for key in ("rel_change", "eff_rank", "cka")})
    try:
        out.update(weight_measures(backbone, start_state, blocks, max_matrix_elements))
    except Exception as e:  # noqa: BLE001
        failures.append(f"weights: {type(e).__name__}: {e}")
    if batches is not None:
        try:
            out.update(representation_measures(backbone, start_state, blocks, batches, max_examples))
        except Exception as e:  # noqa: BLE001
            failures.append(f"CKA: {type(e).__name__}: {e}")
    if failures:
        log.warning("weight diagnostics left null (%s)", "; ".join(failures))
    return {k: (v if v is None or math.isfinite(v) else None) for k, v in out.items()}
