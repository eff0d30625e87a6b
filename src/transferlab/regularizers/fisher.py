"""Diagonal Fisher information from per-sample gradients.

F_i = 1/N * sum_n (d loss_n / d w_i)^2, at fixed weights, in eval mode (BatchNorm statistics must
not move while we measure; avalanche PR #723). Squaring the *batch-mean* gradient instead, as
avalanche and others do, underestimates F by up to the batch size near convergence (NOTES §2) and
makes lambda mean different things at different batch sizes.

- empirical (default): the dataset's labels y_n.
- true Fisher (`sample_labels=True`): y_n drawn from the model's own softmax, seeded.

How (`method`):
- "hooks" (default): one batched forward and backward of the *summed* loss. In eval mode the
  examples do not interact, so the gradient reaching a layer's output for example n is example
  n's own gradient; each covered layer (Linear, Embedding, LayerNorm, Conv2d, BatchNorm in eval
  mode) forms its per-example weight gradient from its saved input and that output gradient,
  squares it and adds it to F, layer by layer, inside the backward pass. No parameter's batch
  gradient is computed (they do not require grad during the pass), and no more than one layer's
  per-example gradients exist at a time. Parameters no rule covers (a custom module, a tied
  weight, a layer called twice in one forward, a weight its parent also uses directly, a layer
  whose input is changed in place afterwards: the last three found during the first pass) take
  the "vmap" path, restricted to them.

An example's loss is its task's (`model.task.loss`, summed): a class's cross-entropy, or for a
language model the sequence's negative log-likelihood Σ_t −log p(x_t | x_<t) — the Fisher of the
model's distribution over whole sequences, one gradient per text. A model without a task gives
(examples, classes) logits and cross-entropy.
- "vmap": torch.func `vmap(grad(...))` over all of `params`. Exact, but every parameter's
  per-example gradient exists at once, and on transformers SDPA attention has no batching rule
  (it falls back to a loop). MiniLM-L6, 32 examples x 32 tokens, CPU time against one batched
  forward+backward: vmap 4.1x (eager attention no better), a per-example loop 2.9x, hooks 1.2x;
  the small CNN: hooks and vmap both ~1.35x (docs/benchmarks.md, scripts/bench_fisher.py).
Both give the same numbers (to float rounding), so the stage cache key does not depend on it.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from transferlab.collectives import several_ranks, sum_across_ranks
from transferlab.tasks import IGNORE, evaluating, to_device

# vmap path: per-sample gradients hold samples x parameters numbers: a 256-example batch through
# MiniLM's 22.7M parameters would be 23 GB. Each batch is taken in chunks that keep them under this
# size (the same sums; a small CNN's batches stay whole).
PER_SAMPLE_GRAD_BYTES = 1 << 30
# hooks path: the activations a batch keeps for its backward pass grow with examples x tokens
# (MiniLM at 128 tokens: ~27 MB an example). Batches are cut into chunks whose covered layers'
# outputs stay under this many bytes (measured by a forward pass of the first example): about
# 1 GB of activations in all on MiniLM; a small CNN's batches stay whole.
LAYER_OUTPUT_BYTES = 1 << 29
# One layer's per-example gradients are formed this many bytes at a time (at least one example's):
# several examples of a small layer per product, and they stay in the cache.
LAYER_GRAD_BYTES = 1 << 20

METHODS = ("hooks", "vmap")


def diagonal_fisher(model: nn.Module, params: dict[str, torch.Tensor], batches: Iterable,
                    *, sample_labels: bool = False, seed: int = 0, method: str = "hooks") -> dict[str, torch.Tensor]:
    """Fisher diagonal for `params` (a subset of `model.named_parameters()`, by name)."""
    if method not in METHODS:
        raise ValueError(f"diagonal_fisher: method={method!r}; choose one of {', '.join(METHODS)}")
    generator = torch.Generator().manual_seed(seed)
    loss_sum = summed_loss(model)
    fisher = {name: torch.zeros_like(p, memory_format=torch.contiguous_format).detach() for name, p in params.items()}
    count = 0
    with evaluating(model) as device:  # CPU batches go to the model's device
        squares = HookedSquares(model, params) if method == "hooks" else None
        for batch in batches:
            x, y = to_device(batch, device)[:2]
            if sample_labels:
                with torch.no_grad():
                    probs = F.softmax(model(x).float(), dim=-1)
                drawn = torch.multinomial(probs.flatten(0, -2).cpu(), 1, generator=generator).view(probs.shape[:-1])
                y = drawn.to(y.device) if y.dim() == 1 else torch.where(y == IGNORE, y, drawn.roll(1, -1).to(y.device))
            if squares is None:
                add_vmap_squares(model, params, x, y, fisher, loss_sum)
            else:
                squares.add(x, y, fisher)
            count += len(y)
    if several_ranks():
        # DDP: each rank saw its share of the source set; sum the squares and the counts.
        count = int(sum_across_ranks([float(count)])[0])
        for f in fisher.values():
            dist.all_reduce(f)
    if count == 0:
        raise ValueError("diagonal_fisher: no samples")
    return {name: f / count for name, f in fisher.items()}


def summed_loss(model: nn.Module) -> Callable:
    """(logits, labels) → the sum over examples of each example's loss, the model's task's."""
    task = getattr(model, "task", None)
    if task is not None:
        return lambda logits, y: task.loss(logits, y, reduction="sum")

    def cross_entropy(logits, y):
        if logits.dim() != 2:
            raise ValueError(f"diagonal_fisher: logits of shape {tuple(logits.shape)}; expected (examples, classes)")
        return F.cross_entropy(logits, y, reduction="sum")
    return cross_entropy


def add_vmap_squares(model: nn.Module, params: dict[str, torch.Tensor], x, y: torch.Tensor,
                     fisher: dict[str, torch.Tensor], loss_sum: Callable | None = None) -> None:
    """fisher[name] += sum over the batch of the squared per-sample gradients, by vmap(grad).
    Parameters of the model not in `params` keep their own values (functional_call)."""
    weights = {name: p.detach() for name, p in params.items()}
    loss_sum = loss_sum or summed_loss(model)

    def sample_loss(weights, x, y):
        # x: one example (a tensor, or a dict of tensors for text): give it a batch axis back.
        logits = functional_call(model, weights, (tree_map(lambda t: t.unsqueeze(0), x),))
        return loss_sum(logits, y.unsqueeze(0))

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    chunk = max(1, PER_SAMPLE_GRAD_BYTES // sum(w.numel() * w.element_size() for w in weights.values()))
    # no_grad: torch.func.grad still differentiates inside, but records no graph through the
    # parameters it does not differentiate (the head) into the result.
    with torch.no_grad():
        for start in range(0, len(y), chunk):
            part = slice(start, start + chunk)
            grads = per_sample_grads(weights, tree_map(lambda t: t[part], x), y[part])
            for name, g in grads.items():
                fisher[name] += g.square().sum(0)


def normalize_fisher(fisher: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    """`none`; `max`: largest entry becomes 1; `mean`: average entry becomes 1."""
    if how == "none":
        return fisher
    flat = torch.cat([f.flatten() for f in fisher.values()])
    scale = flat.max() if how == "max" else flat.mean()
    if scale <= 0:
        return fisher
    return {name: f / scale for name, f in fisher.items()}


# -- per-layer rules: squared per-example gradients from a layer's input `a` and output gradient `d`
# Each adds sum_n (per-example gradient)^2 into out["weight"] / out["bias"] (those present).
def add_squares_of_products(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> None:
    """out += sum_n (left_n @ right_n)^2 for batches (n, groups, p, k) @ (n, groups, k, q), out
    (groups, p, q). Formed a few examples at a time into one reused buffer: a fresh buffer the
    size of the batch's per-example gradients is page-faulted memory (slower than the products
    themselves), and a small one stays in cache."""
    n = left.shape[0]
    step = max(1, min(n, LAYER_GRAD_BYTES // (out.numel() * out.element_size())))
    buffer = torch.empty((step, *out.shape), dtype=out.dtype, device=out.device)
    for start in range(0, n, step):
        part = buffer[:min(step, n - start)]
        torch.bmm(left[start:start + step].flatten(0, 1), right[start:start + step].flatten(0, 1),
                  out=part.view(-1, *out.shape[1:]))
        if len(part) == 1:
            out.addcmul_(part[0], part[0])
        else:
            out += part.square_().sum(0)


def linear_squares(module: nn.Linear, a: torch.Tensor, d: torch.Tensor, out: dict) -> None:
    n = a.shape[0]
    a3, d3 = a.reshape(n, -1, a.shape[-1]), d.reshape(n, -1, d.shape[-1])  # (n, positions, features)
    if "weight" in out:
        if a3.shape[1] == 1:  # one position per example: (d_n a_n^T)^2 = d_n^2 (a_n^2)^T, one product
            out["weight"].addmm_(d3[:, 0].square().T, a3[:, 0].square())
        else:  # over a sequence: g_n = sum_t d_nt a_nt^T
            add_squares_of_products(d3.transpose(1, 2)[:, None], a3[:, None], out["weight"][None])
    if "bias" in out:
        out["bias"] += d3.sum(1).square().sum(0)


def embedding_squares(module: nn.Embedding, ids: torch.Tensor, d: torch.Tensor, out: dict) -> None:
    # Example n's gradient of row r is the sum of d over n's positions holding token r: sum those
    # (one row per distinct (example, token) pair), then square. The padding row gets no gradient.
    n, width = ids.shape[0], module.embedding_dim
    example = torch.arange(n, device=ids.device).view(n, *[1] * (ids.dim() - 1)).expand_as(ids)
    keys, d = (example * module.num_embeddings + ids).flatten(), d.reshape(-1, width)
    if module.padding_idx is not None:
        keep = ids.flatten() != module.padding_idx
        keys, d = keys[keep], d[keep]
    pairs, which = torch.unique(keys, return_inverse=True)
    per_pair = torch.zeros(len(pairs), width, dtype=d.dtype, device=d.device).index_add_(0, which, d)
    out["weight"].index_add_(0, pairs % module.num_embeddings, per_pair.square_())


def affine_squares(normalized: torch.Tensor, d: torch.Tensor, out: dict, feature_dims: int) -> None:
    """y = x_hat * w + b elementwise over the last `feature_dims` dims of (n, positions..., features)."""
    n, features = d.shape[0], d.shape[d.dim() - feature_dims:]
    if "weight" in out:
        out["weight"] += (d * normalized).reshape(n, -1, *features).sum(1).square().sum(0)
    if "bias" in out:
        out["bias"] += d.reshape(n, -1, *features).sum(1).square().sum(0)


def layer_norm_squares(module: nn.LayerNorm, a: torch.Tensor, d: torch.Tensor, out: dict) -> None:
    normalized = F.layer_norm(a, module.normalized_shape, eps=module.eps)
    affine_squares(normalized, d, out, len(module.normalized_shape))


def batch_norm_squares(module: nn.modules.batchnorm._BatchNorm, a: torch.Tensor, d: torch.Tensor, out: dict) -> None:
    # Eval mode: an affine map of the input normalized by the running statistics (channel dim 1).
    shape = (1, -1) + (1,) * (a.dim() - 2)
    normalized = (a - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
    # channels last, so the shared affine rule sums over (n, positions...) the same way
    affine_squares(normalized.movedim(1, -1), d.movedim(1, -1), out, 1)


def conv2d_squares(module: nn.Conv2d, a: torch.Tensor, d: torch.Tensor, out: dict) -> None:
    # g_n = d_n (out, positions) @ unfold(a_n)^T (positions, in * kh * kw), per group of channels
    if same_padding_conv(module):
        a = module.static_padding(a)
    n, groups, weight = a.shape[0], module.groups, module.weight  # weight: (out, in / groups, kh, kw)
    if "weight" in out:
        per_group = out["weight"].view(groups, -1, weight[0].numel())  # (groups, out / groups, in / groups * kh * kw)
        unfolded = weight[0].numel() * groups * d[0, 0].numel()  # one example's unfolded input
        step = max(1, LAYER_GRAD_BYTES // (unfolded * weight.element_size()))
        for start in range(0, n, step):
            cols = F.unfold(a[start:start + step], module.kernel_size, module.dilation, module.padding, module.stride)
            m, positions = cols.shape[0], cols.shape[-1]
            add_squares_of_products(d[start:start + step].reshape(m, groups, -1, positions),
                                    cols.view(m, groups, -1, positions).transpose(2, 3), per_group)
    if "bias" in out:
        out["bias"] += d.flatten(2).sum(2).square().sum(0)


def same_padding_conv(module: nn.Module) -> bool:
    """EfficientNet-Lite0's convolutions (efficientnet_lite_pytorch's Conv2dStaticSamePadding): a
    fixed zero padding module, then the plain convolution."""
    pad = getattr(module, "static_padding", None)
    return (type(module).__name__ == "Conv2dStaticSamePadding" and isinstance(pad, nn.Module)
            and (isinstance(pad, nn.ZeroPad2d) or type(pad).__name__ == "Identity"))


def rule_for(module: nn.Module) -> Callable | None:
    """The squares rule for a module whose forward is exactly the PyTorch layer's (a subclass with
    its own forward, e.g. a conv that pads inside, falls back), in the configurations it covers."""
    forward = type(module).forward
    if isinstance(module, nn.Linear) and forward is nn.Linear.forward:
        return linear_squares
    if isinstance(module, nn.Embedding) and forward is nn.Embedding.forward:
        # max_norm renormalizes rows in the forward; scale_grad_by_freq divides by batch counts
        return embedding_squares if module.max_norm is None and not module.scale_grad_by_freq else None
    if isinstance(module, nn.LayerNorm) and forward is nn.LayerNorm.forward:
        return layer_norm_squares
    if isinstance(module, nn.Conv2d) and (forward is nn.Conv2d.forward or same_padding_conv(module)):
        ok = module.padding_mode == "zeros" and not isinstance(module.padding, str)
        return conv2d_squares if ok else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and forward is nn.modules.batchnorm._BatchNorm.forward:
        # Only with running statistics in eval mode do the examples not interact.
        return batch_norm_squares if not module.training and module.running_mean is not None else None
    return None


class ParameterUses(TorchFunctionMode):
    """Sees every torch call of a forward pass and notes covered parameters that are used outside
    their own module's forward (e.g. a parent's `F.linear(x, child.weight)`): the rules would miss
    that use's gradient, so their modules fall back."""

    def __init__(self, owner: dict[int, nn.Module]):
        super().__init__()
        self.owner, self.inside, self.outside = owner, None, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        # attribute reads (`.dtype`, `.shape`) are no use; `.T` or `.data` is (they give a tensor)
        if getattr(func, "__name__", "") != "__get__" or isinstance(result, torch.Tensor):
            for t in tree_flatten((args, kwargs))[0]:
                module = self.owner.get(id(t)) if isinstance(t, torch.Tensor) else None
                if module is not None and module is not self.inside:
                    self.outside.add(module)
        return result


class HookedSquares:
    """The "hooks" method for one model and parameter set (see the module docstring)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        self.model, self.params, self.loss_sum = model, params, summed_loss(model)
        wanted = {id(p): name for name, p in params.items()}
        owners = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
        # module -> (rule, {"weight"/"bias": name in params}), for the modules a rule covers; a
        # parameter two modules share (tied weights) needs both uses' sum first: not covered
        self.covered: dict[nn.Module, tuple[Callable, dict[str, str]]] = {}
        for module in model.modules():
            rule = rule_for(module)
            mine = {attr: wanted[id(p)] for attr, p in module._parameters.items()
                    if p is not None and id(p) in wanted and owners[id(p)] == 1}
            if rule is not None and mine and set(module._parameters) <= {"weight", "bias"}:
                self.covered[module] = (rule, mine)
        done = {name for _, names in self.covered.values() for name in names.values()}
        self.rest = {name: p for name, p in params.items() if name not in done}
        self.chunk: int | None = None  # examples per pass, from the first example's measurement

    def add(self, x, y: torch.Tensor, fisher: dict[str, torch.Tensor]) -> None:
        start = 0
        while start < len(y):
            if self.chunk is None and self.covered:
                self.chunk = max(1, LAYER_OUTPUT_BYTES // self.output_bytes(tree_map(lambda t: t[:1], x)))
            size = self.chunk or len(y)
            part = slice(start, start + size)
            xs, ys = tree_map(lambda t: t[part], x), y[part]
            if self.covered:
                self.add_chunk(xs, ys, fisher)
            if self.rest:  # what no rule covers, and what add_chunk found it cannot trust
                add_vmap_squares(self.model, self.rest, xs, ys, fisher, self.loss_sum)
            start += size

    def output_bytes(self, x) -> int:
        """Bytes of the covered layers' outputs for one example x (what a pass keeps grows with it)."""
        total = [0]

        def count(module, inputs, output):
            total[0] += output.numel() * output.element_size()

        handles = [m.register_forward_hook(count) for m in self.covered]
        try:
            with torch.no_grad():
                self.model(x)
        finally:
            for h in handles:
                h.remove()
        return max(1, total[0])

    def add_chunk(self, x, y: torch.Tensor, fisher: dict[str, torch.Tensor]) -> None:
        examples, calls = len(y), Counter()
        untrusted: set[nn.Module] = set()
        uses = ParameterUses({id(self.params[name]): m for m, (_, names) in self.covered.items() for name in names.values()})

        def on_forward_start(module, args, kwargs):
            uses.inside = module

        def on_forward(module, args, kwargs, output):
            uses.inside = None
            calls[module] += 1
            if not output.requires_grad:
                # Nothing upstream requires grad: the graph starts here, at a zero that does. (Not
                # output.requires_grad_(): a leaf that requires grad cannot take a later in-place
                # op, e.g. ReLU(inplace=True).) x + 0 is x.
                output = output + torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            a = (args[0] if args else kwargs["input"]).detach()
            version = a._version  # shared with the input: an in-place change after this shows
            rule, names = self.covered[module]
            if a.shape[0] != output.shape[0] or output.shape[0] not in (1, examples):
                untrusted.add(module)  # not one row per example: its examples cannot be told apart
                return None
            if output.shape[0] < examples:
                # One row shared by every example (BERT's position embeddings, of position ids
                # (1, L)): expanded here, so the gradient arriving is each example's own.
                a, output = a.expand(examples, *a.shape[1:]), output.expand(examples, *output.shape[1:])

            def on_grad(d):
                # A module called twice needs the sum of both calls' gradients before squaring;
                # an input changed in place is not what the layer saw: both fall back.
                if calls[module] > 1 or module in uses.outside or a._version != version:
                    untrusted.add(module)
                else:
                    rule(module, a, d, {attr: fisher[name] for attr, name in names.items()})

            output.register_hook(on_grad)
            return output

        requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        handles = [h for m in self.covered for h in (m.register_forward_pre_hook(on_forward_start, with_kwargs=True),
                                                    m.register_forward_hook(on_forward, with_kwargs=True))]
        try:
            for p, _ in requires_grad:  # no batch gradients: the rules make what is needed
                p.requires_grad_(False)
            with torch.enable_grad():
                with uses:
                    logits = self.model(x)
                loss = self.loss_sum(logits, y)
                if logits.requires_grad:
                    # summed: the gradient reaching example n's activations is that of n's own loss
                    loss.backward()
        finally:
            for h in handles:
                h.remove()
            for p, flag in requires_grad:
                p.requires_grad_(flag)
        untrusted |= uses.outside | {m for m, c in calls.items() if c > 1}
        for module in untrusted:  # from now on the vmap way, this chunk included (in `add`)
            _, names = self.covered.pop(module)
            self.rest.update({name: self.params[name] for name in names.values()})
