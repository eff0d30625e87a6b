"""Weight-space diagnostics (diagnostics.py): each quantity against an independent computation
from its definition — CKA against HSIC written out with centring matrices, its invariances; the
effective rank against numpy's SVD and its fixed points; the relative change by hand — then the
whole function on a SmallCNN (block CKA against running the blocks by hand), LoRA-adapted
encoders and decoders (merged ΔW against peft's own delta), and its never-fail contract."""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.backbones.cnn import SmallCNN
from transferlab.data.loaders import make_loader
from transferlab.diagnostics import effective_rank, linear_cka, weight_diagnostics


# -- CKA ------------------------------------------------------------------------------------------
def hsic(k: np.ndarray, l: np.ndarray) -> float:
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def cka_by_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019), eq. (3) with linear kernels: HSIC(K, L) / √(HSIC(K, K) HSIC(L, L))."""
    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def test_cka_equals_the_hsic_formula():
    rng = np.random.default_rng(0)
    for n, p, q in [(12, 5, 3), (20, 30, 7), (9, 4, 40)]:
        x, y = rng.normal(size=(n, p)), rng.normal(size=(n, q))
        y[:, 0] += 2 * x[:, 0]  # some shared structure, so CKA is not near 0
        got = linear_cka(torch.tensor(x), torch.tensor(y))
        assert got == pytest.approx(cka_by_hsic(x, y), rel=1e-10)
        assert got == pytest.approx(linear_cka(torch.tensor(y), torch.tensor(x)), rel=1e-12)  # symmetric
        assert 0 <= got <= 1


def test_cka_invariances():
    torch.manual_seed(0)
    x = torch.randn(30, 8, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)  # orthogonal transform
    assert linear_cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-12)  # isotropic scaling
    assert linear_cka(x, x + 5.0) == pytest.approx(1.0, abs=1e-12)  # a translation (centring)
    scaled = x * torch.tensor([1.0, 10.0, 1, 1, 1, 1, 1, 1], dtype=torch.float64)
    assert linear_cka(x, scaled) < 0.999  # not invariant to anisotropic scaling
    assert linear_cka(x, torch.ones(30, 4)) is None  # a constant representation: undefined


# -- effective rank -------------------------------------------------------------------------------
def erank_by_svd(matrix: np.ndarray) -> float:
    s = np.linalg.svd(matrix.reshape(matrix.shape[0], -1), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_effective_rank_fixed_points_and_svd():
    torch.manual_seed(0)
    u, v = torch.randn(40, 1, dtype=torch.float64), torch.randn(1, 25, dtype=torch.float64)
    # 1 up to the Gram route's rounding (zero singular values at ≲ 1e-8 σ₁: see effective_rank),
    # and the float32 product's (σ₂… ~1e-7 σ₁)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-5)
    assert effective_rank((u @ v).float()) == pytest.approx(1.0, abs=1e-4)
    for n in (1, 7, 64):
        assert effective_rank(torch.eye(n)) == pytest.approx(n, rel=1e-10)
    assert effective_rank(torch.zeros(5, 6)) == 0.0
    for shape in [(30, 12), (12, 30), (16, 8, 3, 3)]:  # tall, wide, a conv weight as (out, in·k·k)
        m = torch.randn(*shape, dtype=torch.float64)
        assert effective_rank(m) == pytest.approx(erank_by_svd(m.numpy()), rel=1e-9)
    low = torch.randn(50, 3, dtype=torch.float64) @ torch.randn(3, 40, dtype=torch.float64)
    assert 1 < effective_rank(low) <= 3 + 1e-9


# -- the function on a SmallCNN -------------------------------------------------------------------
def cnn_and_data():
    torch.manual_seed(0)
    backbone = SmallCNN((1, 8, 8), channels=[8, 16])
    x, y = torch.rand(96, 1, 8, 8), torch.randint(0, 3, (96,))
    return backbone, x, y


def fine_tune(backbone, x, y, steps=5):
    head = nn.Linear(backbone.feature_dim, 3)
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.5)
    backbone.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(head(backbone(x)), y).backward()
        optimizer.step()


def keys(num_blocks: int) -> set[str]:
    return ({f"diagnostics/block{j}_{k}" for j in range(num_blocks) for k in ("rel_change", "eff_rank", "cka")}
            | {"diagnostics/total_rel_change", "diagnostics/features_cka"})


def test_unchanged_weights_measure_no_change():
    backbone, x, y = cnn_and_data()
    start = {k: v.clone() for k, v in backbone.state_dict().items()}
    out = weight_diagnostics(backbone, start, make_loader((x, y), 32, shuffle=False))
    assert set(out) == keys(2)
    for j in range(2):
        assert out[f"diagnostics/block{j}_rel_change"] == 0.0
        assert out[f"diagnostics/block{j}_eff_rank"] == 0.0  # no matrix moved: a change of rank 0
        assert out[f"diagnostics/block{j}_cka"] == pytest.approx(1.0, abs=1e-9)
    assert out["diagnostics/total_rel_change"] == 0.0
    assert out["diagnostics/features_cka"] == pytest.approx(1.0, abs=1e-9)


def test_relative_change_by_hand():
    backbone, x, y = cnn_and_data()
    start = {k: v.clone() for k, v in backbone.state_dict().items()}
    with torch.no_grad():
        for p in backbone.blocks[1].parameters():
            p.mul_(1.25)
        backbone.blocks[0][0].weight.add_(0.1 * torch.randn_like(backbone.blocks[0][0].weight))
    out = weight_diagnostics(backbone, start)  # no batches: weights only
    assert out["diagnostics/block1_rel_change"] == pytest.approx(0.25, rel=1e-6)  # float32 rounding of 1.25·w
    names0 = [n for n, _ in backbone.named_parameters() if n.startswith("blocks.0.")]
    now = torch.cat([backbone.state_dict()[n].flatten() for n in names0]).double()
    then = torch.cat([start[n].flatten() for n in names0]).double()
    assert out["diagnostics/block0_rel_change"] == pytest.approx(float((now - then).norm() / then.norm()), rel=1e-6)
    every = [n for n, _ in backbone.named_parameters()]
    now = torch.cat([backbone.state_dict()[n].flatten() for n in every]).double()
    then = torch.cat([start[n].flatten() for n in every]).double()
    assert out["diagnostics/total_rel_change"] == pytest.approx(float((now - then).norm() / then.norm()), rel=1e-6)
    # block 1's change is 0.25·W: its effective rank is W's; block 0's only matrix is the conv
    w1 = start["blocks.1.0.weight"].numpy()
    assert out["diagnostics/block1_eff_rank"] == pytest.approx(erank_by_svd(w1), rel=1e-6)
    delta0 = (backbone.blocks[0][0].weight.detach() - start["blocks.0.0.weight"]).numpy()
    assert out["diagnostics/block0_eff_rank"] == pytest.approx(erank_by_svd(delta0), rel=1e-6)
    assert all(out[f"diagnostics/block{j}_cka"] is None for j in range(2)) and out["diagnostics/features_cka"] is None


def test_small_cnn_end_to_end_against_running_the_blocks_by_hand():
    backbone, x, y = cnn_and_data()
    start = {k: v.clone() for k, v in backbone.state_dict().items()}
    start_model = copy.deepcopy(backbone)
    fine_tune(backbone, x, y)
    backbone.train()
    tuned = {k: v.clone() for k, v in backbone.state_dict().items()}
    out = weight_diagnostics(backbone, start, make_loader((x, y), 32, shuffle=False), max_examples=70)
    assert set(out) == keys(2)
    # nothing about the backbone moved: its weights, BatchNorm statistics and mode
    assert all(torch.equal(tuned[k], v) for k, v in backbone.state_dict().items()) and backbone.training
    for j in range(2):
        assert out[f"diagnostics/block{j}_rel_change"] > 0
        assert 1 <= out[f"diagnostics/block{j}_eff_rank"] <= (8, 16)[j]
    # block outputs run by hand, in sequence, on the first 70 examples (flattened: ≤ 4,096 features)
    with torch.no_grad():
        a, b = start_model.eval(), backbone.eval()
        ha, hb = x[:70], x[:70]
        for j in range(2):
            ha, hb = a.blocks[j](ha), b.blocks[j](hb)
            expected = cka_by_hsic(ha.flatten(1).double().numpy(), hb.flatten(1).double().numpy())
            assert out[f"diagnostics/block{j}_cka"] == pytest.approx(expected, rel=1e-5)
        expected = cka_by_hsic(a(x[:70]).double().numpy(), b(x[:70]).double().numpy())
        assert out["diagnostics/features_cka"] == pytest.approx(expected, rel=1e-5)
    backbone.train()
    assert 0 < out["diagnostics/block1_cka"] < 1


def test_never_fails_a_run(caplog):
    backbone, x, y = cnn_and_data()
    start = {k: v.clone() for k, v in backbone.state_dict().items() if not k.startswith("blocks.1.")}

    def broken():
        yield (x[:8], y[:8])
        raise RuntimeError("the loader broke")

    with caplog.at_level(logging.WARNING, logger="transferlab.diagnostics"):
        out = weight_diagnostics(backbone, start, broken())
    assert set(out) == keys(2) and all(v is None for v in out.values())
    assert len(caplog.records) == 1 and "blocks.1." in caplog.records[0].getMessage()
    caplog.clear()
    full = {k: v.clone() for k, v in backbone.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="transferlab.diagnostics"):
        out = weight_diagnostics(backbone, full, broken())
    assert out["diagnostics/block0_rel_change"] == 0.0  # the weights are measured; CKA is not
    assert out["diagnostics/features_cka"] is None
    assert len(caplog.records) == 1 and "the loader broke" in caplog.records[0].getMessage()
    with torch.no_grad():  # a diverged run: what is not finite is null, the rest measured
        backbone.blocks[1][1].weight.fill_(float("nan"))
    out = weight_diagnostics(backbone, full, make_loader((x, y), 32, shuffle=False))
    assert out["diagnostics/block1_rel_change"] is None and out["diagnostics/total_rel_change"] is None
    assert out["diagnostics/block0_rel_change"] == 0.0 and out["diagnostics/block0_cka"] == pytest.approx(1.0)
    assert weight_diagnostics(nn.Linear(2, 2), {}) == {"diagnostics/total_rel_change": None,
                                                        "diagnostics/features_cka": None}


# -- transformers: LoRA merged, and a decoder's blocks view ---------------------------------------
def lora_delta_by_peft(backbone) -> dict[str, torch.Tensor]:
    """peft's own ΔW of each adapted layer (its fan_in_fan_out transposition applied), by the
    merged weight's state-dict name."""
    return {f"{path}.weight": m.get_delta_weight("default").detach() for path, m in backbone.named_modules()
            if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")}


def perturb_adapters(backbone):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


def text_batches(n=12, length=10, vocab=1000):
    torch.manual_seed(2)
    ids = torch.randint(5, vocab, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::3, 6:] = 0  # some padded texts
    return [{"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4]} for i in range(0, n, 4)]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_lora_change_is_the_merged_change(family):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from transferlab.backbones.hf import HFEncoder
    from transferlab.backbones.hf_causal import HFDecoder
    from transferlab.freeze.lora import LoRA

    torch.manual_seed(0)
    if family == "bert":
        backbone = HFEncoder.from_config(transformers.BertConfig(
            vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    else:
        backbone = HFDecoder.from_config(transformers.GPT2Config(vocab_size=1000, n_layer=2, n_embd=32, n_head=4,
                                                                 n_positions=32), pooling="mean")
    r = 2
    policy = LoRA(r=r, alpha=4.0, dropout=0.0)
    policy.adapt_backbone(backbone, seed=0)
    start = {k: v.clone() for k, v in backbone.state_dict().items()}
    perturb_adapters(backbone)
    out = weight_diagnostics(backbone, start, text_batches())
    n = backbone.num_blocks
    assert set(out) == keys(n)
    deltas = lora_delta_by_peft(backbone)
    assert deltas
    # the merged change of every block, from peft's ΔW and the base weights
    base = {name: p.detach() for name, p in backbone.named_parameters() if "lora_" not in name}
    base = {name.replace(".base_layer.", "."): p for name, p in base.items()}
    named = {id(p): name for name, p in backbone.named_parameters(remove_duplicate=False)}
    for j, block in enumerate(backbone.blocks):
        names = {named[id(p)].replace(".base_layer.", ".") for p in block.parameters() if "lora_" not in named[id(p)]}
        moved = sum(float(deltas[k].double().pow(2).sum()) for k in names if k in deltas)
        norm = sum(float(base[k].double().pow(2).sum()) for k in names)
        assert out[f"diagnostics/block{j}_rel_change"] == pytest.approx(math.sqrt(moved / norm), rel=1e-6, abs=1e-12)
        ranks = [erank_by_svd(deltas[k].double().numpy()) for k in sorted(names) if k in deltas]
        if ranks:  # the mean over the adapted matrices (the others did not move); each ≤ r
            assert out[f"diagnostics/block{j}_eff_rank"] == pytest.approx(np.mean(ranks), rel=1e-6)
            assert 1 <= out[f"diagnostics/block{j}_eff_rank"] <= r + 1e-9
    # CKA: every block, a decoder's embeddings too (forward_intermediates returns their output);
    # LoRA leaves the embeddings as they were, so they represent the inputs exactly as at the start
    assert out["diagnostics/block0_cka"] == pytest.approx(1.0, abs=1e-6)
    assert out["diagnostics/block0_rel_change"] == 0.0 and out["diagnostics/block0_eff_rank"] is None  # embeddings
    for j in range(1, n):
        assert 0 < out[f"diagnostics/block{j}_cka"] <= 1 + 1e-9
    assert 0 < out["diagnostics/features_cka"] <= 1 + 1e-9
