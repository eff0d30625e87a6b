"""Penalty gradients added to .grad equal autograd's gradient of the penalty written out by hand;
the Fisher equals a per-sample loop; frozen parameters get nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import prepare_statistics
from transferlab.method import MethodContext
from transferlab.backbones.cnn import SmallCNN
from transferlab.regularizers.ewc import EWC
from transferlab.regularizers.fisher import diagonal_fisher, normalize_fisher
from transferlab.regularizers.l2 import L2
from transferlab.regularizers.l2sp import L2SP

torch.set_default_dtype(torch.float32)


def small_model(seed=0):
    torch.manual_seed(seed)
    backbone = SmallCNN((1, 8, 8), channels=[4, 6])
    head = nn.Linear(backbone.feature_dim, 3)
    return backbone, head


def batch(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def move(module, seed=2, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def grads_of(params):
    return [p.grad.clone() for p in params]


def check_penalty(reg, backbone, head, autograd_penalty):
    """Task-loss grad + reg.add_penalty_grad_ must equal autograd(task loss + penalty)."""
    x, y = batch()
    params = [*backbone.parameters(), *head.parameters()]
    loss = F.cross_entropy(head(backbone(x)), y)
    (loss + autograd_penalty()).backward()
    expected = grads_of(params)
    for p in params:
        p.grad = None
    F.cross_entropy(head(backbone(x)), y).backward()
    reg.add_penalty_grad_()
    for got, want in zip(grads_of(params), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(reg.penalty(), autograd_penalty().detach(), atol=1e-6, rtol=1e-5)


def test_l2_gradient_equals_autograd():
    backbone, head = small_model()
    reg = L2(alpha=0.3)
    reg.attach(MethodContext(backbone=backbone, head=head))
    penalty = lambda: 0.3 / 2 * sum((p ** 2).sum() for p in [*backbone.parameters(), *head.parameters()])  # noqa: E731
    check_penalty(reg, backbone, head, penalty)


def test_l2sp_gradient_equals_autograd():
    backbone, head = small_model()
    anchors = [p.detach().clone() for p in backbone.parameters()]
    reg = L2SP(alpha=0.7, beta=0.05)
    reg.attach(MethodContext(backbone=backbone, head=head))
    move(backbone)  # otherwise w == w0 and the L2-SP term is trivially zero
    move(head, seed=3)

    def penalty():
        drift = sum(((p - a) ** 2).sum() for p, a in zip(backbone.parameters(), anchors))
        return 0.7 / 2 * drift + 0.05 / 2 * sum((p ** 2).sum() for p in head.parameters())

    assert float(penalty().detach()) > 1e-3
    check_penalty(reg, backbone, head, penalty)


@pytest.mark.parametrize("normalize", ["none", "max"])
def test_ewc_gradient_equals_autograd(normalize):
    backbone, head = small_model()
    model = nn.Sequential(backbone, head)
    reg = EWC(lam=50.0, normalize=normalize)
    prepare_statistics(reg, model, [batch(seed=5, n=20)], backbone)
    fisher = [f.clone() for f in reg.fisher]
    anchors = [p.detach().clone() for p in backbone.parameters()]
    new_head = nn.Linear(backbone.feature_dim, 3)
    reg.attach(MethodContext(backbone=backbone, head=new_head))
    move(backbone)

    def penalty():
        return 50.0 / 2 * sum((f * (p - a) ** 2).sum() for f, p, a in zip(fisher, backbone.parameters(), anchors))

    assert float(penalty().detach()) > 1e-4
    if normalize == "max":
        assert max(float(f.max()) for f in fisher) == pytest.approx(1.0)
    check_penalty(reg, backbone, new_head, penalty)


def test_frozen_parameters_get_no_penalty_gradient():
    backbone, head = small_model()
    reg = L2SP(alpha=0.7, beta=0.05)
    reg.attach(MethodContext(backbone=backbone, head=head))
    anchors = [p.detach().clone() for p in backbone.blocks[1].parameters()]
    move(backbone)
    frozen = list(backbone.blocks[0].parameters())
    x, y = batch()
    F.cross_entropy(head(backbone(x)), y).backward()
    for p in frozen:
        p.grad = None  # what a freeze policy does for a block frozen this epoch
    task = [p.grad.clone() for p in [*backbone.blocks[1].parameters(), *head.parameters()]]
    reg.add_penalty_grad_()
    assert all(p.grad is None for p in frozen)
    # the parameters that train get theirs, as if nothing were frozen: α(w − w₀) and β·w on the head
    for p, w0, g in zip(backbone.blocks[1].parameters(), anchors, task):
        torch.testing.assert_close(p.grad, g + 0.7 * (p.detach() - w0), atol=1e-7, rtol=1e-6)
    for p, g in zip(head.parameters(), task[len(anchors):]):
        torch.testing.assert_close(p.grad, g + 0.05 * p.detach(), atol=1e-7, rtol=1e-6)


def per_sample_loop_fisher(model, params, x, y):
    model.eval()
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in params.items():
            fisher[n] += p.grad.detach() ** 2
    return {n: f / len(y) for n, f in fisher.items()}


def test_fisher_equals_per_sample_loop_in_eval_mode():
    backbone, head = small_model()
    model = nn.Sequential(backbone, head)
    # Non-trivial BatchNorm statistics: the Fisher must use them (eval mode), and not change them.
    model.train()
    with torch.no_grad():
        model(batch(seed=9, n=64)[0] * 3)
    running = backbone.blocks[0][1].running_mean.clone()
    model.train()
    params = {n: p for n, p in model.named_parameters() if n.startswith("0.")}
    x, y = batch(seed=4, n=24)
    got = diagonal_fisher(model, params, [(x[:10], y[:10]), (x[10:], y[10:])])
    want = per_sample_loop_fisher(model, params, x, y)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)
    assert torch.equal(backbone.blocks[0][1].running_mean, running)
    # Squared batch-mean gradients (the avalanche shortcut) give a much smaller number.
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    shortcut = sum(float((p.grad ** 2).sum()) for p in params.values())
    assert shortcut < 0.5 * sum(float(f.sum()) for f in want.values())


def test_true_fisher_samples_labels_from_the_model_reproducibly():
    backbone, head = small_model()
    model = nn.Sequential(backbone, head)
    params = {n: p for n, p in model.named_parameters() if n.startswith("0.")}
    data = [batch(seed=4, n=32)]
    a = diagonal_fisher(model, params, data, sample_labels=True, seed=0)
    b = diagonal_fisher(model, params, data, sample_labels=True, seed=0)
    empirical = diagonal_fisher(model, params, data)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.allclose(a[n], empirical[n]) for n in a)


def test_fisher_normalization():
    fisher = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([4.0])}
    assert float(normalize_fisher(fisher, "max")["b"]) == 1.0
    assert torch.allclose(normalize_fisher(fisher, "mean")["a"], torch.tensor([0.375, 1.125]))
    assert normalize_fisher(fisher, "none") is fisher


def test_fisher_in_bounded_chunks_equals_whole_batches(monkeypatch):
    from transferlab.regularizers import fisher as fisher_module

    backbone, head = small_model()
    model = nn.Sequential(backbone, head)
    params = {n: p for n, p in model.named_parameters() if n.startswith("0.")}
    data = [batch(seed=4, n=24)]
    whole = diagonal_fisher(model, params, data, method="vmap")
    sizes = []
    real_vmap = fisher_module.vmap

    def recording_vmap(fn, **kwargs):
        mapped = real_vmap(fn, **kwargs)
        return lambda w, x, y: sizes.append(len(y)) or mapped(w, x, y)

    per_sample = sum(p.numel() * p.element_size() for p in params.values())
    monkeypatch.setattr(fisher_module, "vmap", recording_vmap)
    monkeypatch.setattr(fisher_module, "PER_SAMPLE_GRAD_BYTES", 5 * per_sample)  # 5 samples' gradients
    chunked = diagonal_fisher(model, params, data, method="vmap")
    assert sizes == [5, 5, 5, 5, 4]
    for n in whole:
        torch.testing.assert_close(chunked[n], whole[n], atol=1e-7, rtol=1e-6)
