"""The diagonal Fisher by per-layer hooks (the default) equals a plain per-example loop, on the
CNN (BatchNorm, dropout), on a 1-layer MiniLM (padding, repeated tokens, broadcast position
embeddings), on convolutions with groups / stride / dilation / bias; what no rule covers falls
back to vmap and still matches; sampled labels give the same Fisher as the vmap path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.backbones.cnn import SmallCNN
from transferlab.regularizers import fisher as fisher_module
from transferlab.regularizers.fisher import HookedSquares, diagonal_fisher


def loop_fisher(model, params, x, y):
    """The definition: one example at a time, its own loss's gradient, squared; eval mode."""
    model.eval()
    frozen = [p for p in params.values() if not p.requires_grad]
    for p in frozen:  # measured all the same
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(y)):
        model.zero_grad()
        xi = {k: v[i:i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i:i + 1]
        F.cross_entropy(model(xi), y[i:i + 1]).backward()
        for n, p in params.items():
            fisher[n] += p.grad.detach() ** 2
    model.zero_grad()
    for p in frozen:
        p.requires_grad_(False)
    return {n: f / len(y) for n, f in fisher.items()}


def assert_fisher_close(got, want, rtol=1e-5):
    """Every parameter to `rtol` of its own largest entry. A parameter whose Fisher is zero up to
    rounding (BERT's key bias: softmax ignores a shift of all scores) is held to `rtol` of 1e-6 of
    the largest entry of all instead: its "relative" error is rounding noise over zero."""
    assert set(got) == set(want)
    overall = max(float(w.abs().max()) for w in want.values())
    assert overall > 0
    for n in want:
        scale = max(float(want[n].abs().max()), 1e-6 * overall)
        error = float((got[n] - want[n]).abs().max())
        assert error <= rtol * scale, f"{n}: max |difference| {error:.3g} > {rtol} x {scale:.3g}"


def covered_everything(model, params) -> bool:
    return not HookedSquares(model.eval(), params).rest


# -- CNN: conv, BatchNorm (eval: running statistics), dropout, a head ------------------------------
def cnn(seed=0):
    torch.manual_seed(seed)
    backbone = SmallCNN((1, 8, 8), channels=[4, 6])
    model = nn.Sequential(backbone, nn.Dropout(0.5), nn.Linear(backbone.feature_dim, 3))
    model.train()
    with torch.no_grad():  # running statistics that are not the initial 0 / 1
        model(torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(9)) * 3)
    return model


def images(n=24, seed=4, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_cnn_fisher_by_hooks_equals_the_loop_and_leaves_the_model_as_it_was():
    model = cnn()
    params = dict(model.named_parameters())
    model[2].weight.requires_grad_(False)  # a frozen parameter: still measured, still frozen after
    x, y = images()
    assert covered_everything(model, params)
    bn = model[0].blocks[0][1]
    running, training = bn.running_mean.clone(), model.train().training
    got = diagonal_fisher(model, params, [(x[:10], y[:10]), (x[10:], y[10:])])
    assert model.training and torch.equal(bn.running_mean, running)  # mode back, statistics untouched
    assert not model[2].weight.requires_grad and model[0].blocks[0][0].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())  # no batch gradients left behind
    assert_fisher_close(got, loop_fisher(model, params, x, y))
    assert training


def test_convolutions_with_groups_stride_dilation_bias_and_layer_norm():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.Conv2d(6, 6, 3, groups=3, dilation=2, padding=2, bias=False), nn.Tanh(),
        nn.Conv2d(6, 4, (1, 2)), nn.Flatten(), nn.LayerNorm(4 * 4 * 3), nn.Dropout(0.3), nn.Linear(48, 5))
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 2, 8, 8))
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(20, 2, 8, 8, generator=g), torch.randint(0, 5, (20,), generator=g)
    assert covered_everything(model, params)
    assert_fisher_close(diagonal_fisher(model, params, [(x, y)]), loop_fisher(model, params, x, y))


def test_chunks_and_small_product_groups_give_the_same_fisher(monkeypatch):
    model = cnn()
    params = {n: p for n, p in model.named_parameters() if n.startswith("0.")}
    data = [images(n=40, seed=6)]
    whole = diagonal_fisher(model, params, data)
    # chunks of 5 examples (their covered layers' outputs: conv and BatchNorm twice each, the head),
    # one example's gradient per product
    monkeypatch.setattr(fisher_module, "LAYER_OUTPUT_BYTES", 5 * 4 * (4 * 8 * 8 * 2 + 6 * 4 * 4 * 2 + 3))
    monkeypatch.setattr(fisher_module, "LAYER_GRAD_BYTES", 1)
    squares = HookedSquares(model.eval(), params)
    chunked = {n: torch.zeros_like(p) for n, p in params.items()}
    squares.add(*data[0], chunked)
    assert squares.chunk == 5
    for n in whole:
        torch.testing.assert_close(chunked[n] / 40, whole[n], atol=1e-8, rtol=1e-5)


# -- MiniLM, 1 layer: embeddings (padding row, repeated tokens, positions shared by the batch) ----
@pytest.fixture(scope="module")
def minilm_task():
    from transferlab.backbones.minilm import MiniLM
    from transferlab.data.text import tokenize
    from transferlab.stages.module import TaskModule

    torch.manual_seed(0)
    backbone = MiniLM(num_layers=1)
    model = TaskModule(backbone, nn.Linear(backbone.feature_dim, 3), stage="source", lr=1e-3)
    texts = ["great flight, thanks!", "my bag is lost and nobody answers the phone at all", "ok",
             "the the the cat sat on the mat", "delayed again #fail", "no no no no"]
    x = dict(tokenize(np.array(texts, dtype=object), backbone.tokenizer, max_length=32)[list(range(len(texts)))])
    y = torch.tensor([2, 0, 1, 1, 0, 0])
    mine = {id(p) for p in backbone.parameters()}
    params = {n: p for n, p in model.named_parameters() if id(p) in mine}  # what EWC measures
    return model, params, x, y


def test_minilm_fisher_by_hooks_equals_the_loop(minilm_task):
    model, params, x, y = minilm_task
    ids = x["input_ids"]
    assert (x["attention_mask"] == 0).any()  # padding: the padding row gets no gradient
    assert any(len(set(row.tolist())) < len(row) for row in ids[:, :5])  # a token repeated in one text
    assert covered_everything(model, params)  # no parameter took the vmap way
    got = diagonal_fisher(model, params, [({k: v[:4] for k, v in x.items()}, y[:4]),
                                         ({k: v[4:] for k, v in x.items()}, y[4:])])
    want = loop_fisher(model, params, x, y)
    assert_fisher_close(got, want)
    word = next(n for n in want if n.endswith("word_embeddings.weight"))
    assert float(got[word][0].abs().max()) == 0.0  # [PAD] = row 0 (padding_idx)
    assert float(want[word][ids[3, 2]].abs().max()) > 0


def test_sampled_labels_give_the_same_fisher_as_the_vmap_path(minilm_task):
    model, params, x, y = minilm_task
    subset = {n: p for n, p in params.items() if ".attention." in n or "LayerNorm" in n}  # quicker vmap
    data = [({k: v[:3] for k, v in x.items()}, y[:3]), ({k: v[3:] for k, v in x.items()}, y[3:])]
    hooks = diagonal_fisher(model, subset, data, sample_labels=True, seed=3)
    vmap = diagonal_fisher(model, subset, data, sample_labels=True, seed=3, method="vmap")
    empirical = diagonal_fisher(model, subset, data)
    assert_fisher_close(hooks, vmap)
    assert any(not torch.allclose(hooks[n], empirical[n]) for n in subset)


def test_sampled_labels_on_the_cnn_equal_the_vmap_path():
    model = cnn()
    params = dict(model.named_parameters())
    data = [images(n=32, seed=7)]
    hooks = diagonal_fisher(model, params, data, sample_labels=True, seed=1)
    vmap = diagonal_fisher(model, params, data, sample_labels=True, seed=1, method="vmap")
    assert_fisher_close(hooks, vmap)
    assert any(not torch.allclose(hooks[n], diagonal_fisher(model, params, data)[n]) for n in params)


# -- what no rule covers ------------------------------------------------------------------------------
class Awkward(nn.Module):
    """A parameter of no covered layer, a layer called twice, a tied weight, a weight a parent
    uses itself, and a Linear subclass with its own forward: each needs the vmap way."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(8))
        self.twice = nn.Linear(8, 8)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight
        self.used_outside = nn.Linear(8, 8)
        self.subclass = Doubled(8, 8)
        self.plain = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(x * self.scale)
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        h = torch.tanh(self.a(h)) + self.b(h)
        h = torch.tanh(self.used_outside(h)) + 0.5 * F.linear(h, self.used_outside.weight.T)
        return self.head(torch.tanh(self.plain(torch.tanh(self.subclass(h)))))


class Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_parameters_no_rule_covers_fall_back_and_still_match():
    torch.manual_seed(1)
    model = Awkward()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 8, generator=g), torch.randint(0, 3, (12,), generator=g)
    squares = HookedSquares(model.eval(), params)
    # known before any pass: no rule, tied, a subclass with its own forward
    assert set(squares.rest) == {"scale", "a.weight", "subclass.weight", "subclass.bias"}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    squares.add(x, y, fisher)
    # found in the first pass: called twice, used outside its module
    assert set(squares.rest) == {"scale", "a.weight", "subclass.weight", "subclass.bias", "twice.weight",
                                 "twice.bias", "used_outside.weight", "used_outside.bias"}
    want = loop_fisher(model, params, x, y)
    assert_fisher_close({n: f / len(y) for n, f in fisher.items()}, want)
    assert_fisher_close(diagonal_fisher(model, params, [(x[:5], y[:5]), (x[5:], y[5:])]), want)


def test_unknown_method_is_named():
    model = cnn()
    with pytest.raises(ValueError, match="method='fast'"):
        diagonal_fisher(model, dict(model.named_parameters()), [images()], method="fast")


def test_efficientnet_same_padding_convolutions_are_covered_and_match():
    from transferlab.backbones.efficientnet import EfficientNetLite0

    torch.manual_seed(0)
    backbone = EfficientNetLite0((1, 28, 28), image_size=32)
    model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, 3))
    params = {n: p for n, p in model.named_parameters() if n.startswith("0.")}
    g = torch.Generator().manual_seed(8)
    x, y = torch.rand(6, 1, 28, 28, generator=g), torch.randint(0, 3, (6,), generator=g)
    assert covered_everything(model, params)  # depthwise, strided, padded: all by rules
    assert_fisher_close(diagonal_fisher(model, params, [(x, y)]), loop_fisher(model, params, x, y))


def test_lora_adapters_are_covered_and_match(minilm_task):
    from peft import LoraConfig, inject_adapter_in_model
    from transferlab.backbones.minilm import MiniLM

    torch.manual_seed(0)
    backbone = MiniLM(num_layers=1)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]), backbone)
    with torch.no_grad():  # B != 0, so A's Fisher is not trivially zero
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, 3))
    params = {n: p for n, p in model.named_parameters() if "lora_" in n or "LayerNorm" in n}
    _, _, x, y = minilm_task
    assert covered_everything(model, params)
    assert_fisher_close(diagonal_fisher(model, params, [(x, y)]), loop_fisher(model, params, x, y))


def test_an_in_place_op_right_after_the_first_layer():
    from transferlab.backbones.mlp import MLP

    torch.manual_seed(0)
    backbone = MLP((1, 8, 8), hidden=[16, 8], dropout=0.2)  # Linear -> ReLU(inplace=True) first
    model = nn.Sequential(backbone, nn.Linear(8, 3))
    params = dict(model.named_parameters())
    x, y = images(n=10)
    assert covered_everything(model, params)
    assert_fisher_close(diagonal_fisher(model, params, [(x, y)]), loop_fisher(model, params, x, y))
