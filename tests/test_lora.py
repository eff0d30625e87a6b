"""freeze=lora on a 1-layer MiniLM: injection changes nothing until training, only adapters and the
head train (count and bit-identical base weights), L2-SP/EWC penalty gradients on the adapted
model equal autograd, the EWC statistics cache tells adapted from plain backbones apart."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from conftest import prepare_statistics, assert_penalty_matches_autograd, compose_config
from transferlab.method import MethodContext
from transferlab.backbones.cnn import SmallCNN
from transferlab.backbones.minilm import MiniLM
from transferlab.data.loaders import make_loader
from transferlab.data.text import tokenize
from transferlab.data.tweets import load_tweets_sentiment
from transferlab.errors import ConfigError
from transferlab.experiment import run_experiment
from transferlab.freeze.lora import LoRA
from transferlab.heads import classification_head
from transferlab.regularizers.ewc import EWC
from transferlab.regularizers.l2sp import L2SP
from transferlab.stages.module import TaskModule

HIDDEN = 384  # MiniLM's width: query and value are 384 → 384 Linear layers


def lora(r=4, alpha=8.0, dropout=0.0):
    return LoRA(r=r, alpha=alpha, dropout=dropout, target_modules=["query", "value"])


@pytest.fixture(scope="module")
def tweets():
    pool = load_tweets_sentiment()
    rng = np.random.default_rng(0)
    pick = rng.choice(len(pool.y_train), 48, replace=False)
    return pool.x_train[pick], torch.from_numpy(pool.y_train[pick])


def adapted_minilm(r=4, seed=0):
    torch.manual_seed(0)
    backbone = MiniLM(num_layers=1)
    lora(r).adapt_backbone(backbone, seed=seed)
    return backbone


def is_adapter(name):
    return "lora_" in name


def test_injection_keeps_the_parameters_and_the_function(tweets):
    torch.manual_seed(0)
    backbone = MiniLM(num_layers=1).eval()
    batch = tokenize(tweets[0][:8], backbone.tokenizer, 32)[list(range(8))]
    query = backbone.blocks[1].attention.self.query.weight
    originals = {id(p) for p in backbone.parameters()}
    with torch.no_grad():
        before = backbone(batch)
    lora(r=4).adapt_backbone(backbone, seed=0)
    named = dict(backbone.named_parameters())
    # the same Parameter objects, now under base_layer; two adapters of r x 384 and 384 x r per layer
    assert named["blocks.1.attention.self.query.base_layer.weight"] is query
    assert {id(p) for n, p in named.items() if not is_adapter(n)} == originals
    adapters = {n: p for n, p in named.items() if is_adapter(n)}
    assert sorted(tuple(p.shape) for p in adapters.values()) == [(4, HIDDEN)] * 2 + [(HIDDEN, 4)] * 2
    assert all(float(p.detach().abs().sum()) == 0 for n, p in adapters.items() if "lora_B" in n)
    with torch.no_grad():
        assert torch.equal(backbone(batch), before)  # B = 0: exactly the pretrained function
    # seeded: the same A for the same seed, whatever the global RNG did in between
    torch.manual_seed(123)
    again = adapted_minilm(r=4, seed=0)
    assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in adapters.items())


def test_only_adapters_and_head_move_in_a_fit(tweets):
    backbone = adapted_minilm(r=4)
    tokens = tokenize(tweets[0], backbone.tokenizer, 32)
    head = classification_head(backbone.feature_dim, 3)
    # weight_decay > 0: decoupled decay would move frozen weights if AdamW touched them
    module = TaskModule(backbone, head, stage="target", lr=1e-2, weight_decay=0.1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[lora(r=4)], num_sanity_val_steps=0)
    trainer.fit(module, make_loader((tokens, tweets[1]), 16, shuffle=True), make_loader((tokens, tweets[1]), 48, shuffle=False))
    after = module.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    adapters = {k for k in before if is_adapter(k)}
    assert len(adapters) == 4 and {"head.weight", "head.bias"} <= moved
    assert moved == adapters | {"head.weight", "head.bias"}  # every adapter moved; no base weight did
    # the frozen base weights sat in the optimizer's per-block groups all along, harmlessly
    groups = trainer.optimizers[0].param_groups
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in module.parameters())


def test_lora_needs_named_linear_layers():
    with pytest.raises(ConfigError, match=r"freeze.target_modules=\['query', 'value'\].*transformer backbone"):
        lora().check_backbone(SmallCNN((1, 8, 8), channels=[4]))
    with pytest.raises(ConfigError, match=r"freeze.target_modules=\['attention'\].*not a Linear"):
        LoRA(8, 16, 0.0, ["attention"]).check_backbone(MiniLM(num_layers=1))
    from transferlab.config import validate

    with pytest.raises(ConfigError, match="freeze.r=0: must be > 0"):  # the signature's PositiveInt
        validate(compose_config(["freeze=lora", "freeze.r=0"]))


# -- penalties apply to what trains ---------------------------------------------------------------
def move_trainable(*modules, seed=2, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(scale * torch.randn(p.shape, generator=g))


def check_against_autograd(reg, backbone, head, batch, y, penalty):
    """The penalty's gradient == autograd on the parameters that train; the frozen base gets no
    gradient at all."""
    assert_penalty_matches_autograd(reg, backbone, head, batch, y, penalty)
    assert all(p.grad is None for n, p in backbone.named_parameters() if not is_adapter(n))


def test_l2sp_gradient_on_the_lora_model_equals_autograd(tweets):
    backbone = adapted_minilm(r=4).eval()  # eval: no dropout, so two passes give the same loss
    head = nn.Linear(HIDDEN, 3)
    named = dict(backbone.named_parameters())
    anchors = {n: p.detach().clone() for n, p in named.items() if is_adapter(n)}
    reg = L2SP(alpha=0.7, beta=0.05)
    reg.attach(MethodContext(backbone=backbone, head=head))
    move_trainable(backbone, head)
    batch, y = tokenize(tweets[0][:6], backbone.tokenizer, 32)[list(range(6))], tweets[1][:6]

    def penalty():  # over the adapters only: the base does not train; B's anchor is 0
        assert all(float(a.abs().sum()) == 0 for n, a in anchors.items() if "lora_B" in n)
        drift = sum(((named[n] - a) ** 2).sum() for n, a in anchors.items())
        return 0.7 / 2 * drift + 0.05 / 2 * sum((p ** 2).sum() for p in head.parameters())

    assert float(penalty().detach()) > 1e-3
    check_against_autograd(reg, backbone, head, batch, y, penalty)


def test_ewc_gradient_on_the_lora_model_equals_autograd(tweets):
    backbone = adapted_minilm(r=4).eval()
    source_head = nn.Linear(HIDDEN, 3)
    tokens = tokenize(tweets[0][:24], backbone.tokenizer, 32)
    reg = EWC(lam=50.0)
    prepare_statistics(reg, nn.Sequential(backbone, source_head),
                            make_loader((tokens, tweets[1][:24]), 12, shuffle=False), backbone)
    backbone.eval()  # the Fisher pass hands the (train-mode) Sequential back in train mode: dropout off again
    names = reg.names
    assert names == [n for n, _ in backbone.named_parameters() if is_adapter(n)]  # adapter-sized, not model-sized
    fisher = dict(zip(names, [f.clone() for f in reg.fisher]))
    # at B = 0 the loss does not depend on A (dL/dA = B^T ...): its Fisher is exactly 0; B's is not
    assert all(float(f.abs().sum()) == 0 for n, f in fisher.items() if "lora_A" in n)
    assert all(float(f.sum()) > 0 for n, f in fisher.items() if "lora_B" in n)
    named = dict(backbone.named_parameters())
    anchors = {n: p.detach().clone() for n, p in named.items()}
    head = nn.Linear(HIDDEN, 3)
    reg.attach(MethodContext(backbone=backbone, head=head))
    move_trainable(backbone)
    batch, y = tokens[list(range(6))], tweets[1][:6]

    def penalty():  # EWC over what trains: the adapters (the base never moves)
        return 50.0 / 2 * sum((fisher[n] * (named[n] - anchors[n]) ** 2).sum() for n in names)

    assert float(penalty().detach()) > 1e-5
    check_against_autograd(reg, backbone, head, batch, y, penalty)


# -- whole runs ---------------------------------------------------------------------------------------
def lora_cfg(tmp_path, *overrides, freeze=("freeze=lora", "freeze.r=4")):
    return compose_config([
        "experiment=tweets_domain_shift", "logger=csv", f"paths.output_root={tmp_path / 'outputs'}",
        "backbone.num_layers=1", *freeze, "data.source_train_size=48",
        "data.target_train_size=48", "data.val_fraction=0.005", "data.test_fraction=0.005", "data.max_length=32",
        "source.epochs=1", "target.epochs=1", "source.batch_size=16", "target.batch_size=16", "target.lr=1e-3",
        *overrides])


def test_lora_run_counts_adapters_and_keeps_the_pretrained_weights(tmp_path):
    m = run_experiment(lora_cfg(tmp_path, "source=pretrained", "regularizer=l2sp"), tmp_path / "run")["metrics"]
    pretrained = MiniLM(num_layers=1)
    base = sum(p.numel() for p in pretrained.parameters())
    adapters = 2 * 4 * (HIDDEN + HIDDEN)  # query and value: r·(in + out) each
    head = HIDDEN * 3 + 3
    assert m["params/trainable"] == adapters + head
    assert m["params/total"] == base + adapters + head
    saved = torch.load(tmp_path / "run" / "checkpoints" / "target.pt", weights_only=True)["backbone"]
    for name, value in pretrained.state_dict().items():
        name = name.replace(".query.", ".query.base_layer.").replace(".value.", ".value.base_layer.")
        assert torch.equal(saved[name], value), name  # bit-identical after the target fit
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if "lora_B" in k)


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_ewc_statistics_cache_key_includes_the_adapters(tmp_path):
    first = run_experiment(lora_cfg(tmp_path, "regularizer=ewc"), tmp_path / "a")["metrics"]
    again = run_experiment(lora_cfg(tmp_path, "regularizer=ewc"), tmp_path / "b")["metrics"]
    plain = run_experiment(lora_cfg(tmp_path, "regularizer=ewc", freeze=["freeze=full"]), tmp_path / "c")["metrics"]
    assert first["cache/ewc_statistics_hit"] is False and again["cache/ewc_statistics_hit"] is True
    assert again["cache/source_hit"] is True and again["target/test_acc"] == first["target/test_acc"]
    # the same source stage, but other parameters: its own Fisher, not the LoRA one's
    assert plain["cache/source_hit"] is True and plain["cache/ewc_statistics_hit"] is False
    entries = [p for p in (tmp_path / "outputs" / "cache" / "method_statistics").iterdir() if p.is_dir()]
    assert len(entries) == 2  # one key each: neither overwrote the other
    for m in (first, plain):
        assert m["source/test_acc_before"] is not None and m["transfer/forgetting"] is not None
