"""Frozen blocks computed once on decoder-only backbones (issue 25, item 1): backbone=hf_causal
(tiny random GPT-2 and Llama folders) × freeze=partial with the frozen-block cache on trains
exactly as without it — with and without a loss-term method (LwF). Before, the cache re-ran
the layers as an encoder's: an IndexError for k=1 (the embeddings block is a view the model's
forward never calls) and `LayerNorm.forward() got an unexpected keyword argument
'attention_mask'` when the final norm was the first block to train."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import compose_config
from test_decoder import completed, tiny_config
from test_frozen_prefix import USED, assert_same_runs
from transferlab.backbones.hf_causal import HFDecoder
from transferlab.backbones.minilm import minilm_path
from transferlab.experiment import run_experiment
from transferlab.stages.frozen_prefix import FromBlock, block_output

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """A saved tiny random decoder per family (2 layers: blocks = embeddings, 2 layers, norm)."""
    made = {}
    for family in ("gpt2", "llama"):
        folder = tmp_path_factory.mktemp(f"tiny_{family}")
        torch.manual_seed(0)
        transformers.AutoModel.from_config(tiny_config(family, tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        made[family] = folder
    return made


def decoder_cfg(tmp_path, folder, *overrides):
    """The stage cache on (under tmp_path), as by default: the frozen blocks' outputs go through it."""
    return compose_config([
        "experiment=tweets_domain_shift", "backbone=hf_causal", f"backbone.name={folder}", "logger=csv",
        f"paths.output_root={tmp_path / 'outputs'}", "data.source_train_size=40", "data.target_train_size=40",
        "data.val_fraction=0.005", "data.test_fraction=0.005", "data.max_length=24", "source.epochs=1",
        "target.epochs=2", "target.batch_size=8", "target.lr=1e-3", "evaluate.transferability=false", *overrides])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("k,regularizer", [(1, "none"), (2, "lwf"), (3, "lwf")])
def test_decoder_partial_with_and_without_the_cache_train_the_same(tmp_path, caplog, folders, family, k, regularizer):
    """k=1: only the embeddings frozen; k=2: + the first layer; k=3: every layer, the final norm
    trains. The cache is used (not silently skipped) and the runs agree."""
    overrides = ["freeze=partial", f"freeze.k={k}", f"regularizer={regularizer}"]
    with caplog.at_level(logging.INFO, logger="transferlab.stages.frozen_prefix"):
        on = run_experiment(decoder_cfg(tmp_path, folders[family], *overrides), tmp_path / "on")["metrics"]
    completed(tmp_path / "on")
    assert USED in caplog.text, caplog.text
    assert on["cache/frozen_blocks_hit"] is False  # computed, and kept in the stage cache
    off = run_experiment(decoder_cfg(tmp_path, folders[family], *overrides, "target.cache_frozen_blocks=false"),
                         tmp_path / "off")["metrics"]
    assert_same_runs(tmp_path / "on", tmp_path / "off", tol=1e-4)
    assert on["target/test_acc"] == off["target/test_acc"] and on["target/best_epoch"] == off["target/best_epoch"]
    if regularizer == "lwf":
        assert on["transfer/forgetting"] == pytest.approx(off["transfer/forgetting"], abs=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_decoder_from_block_k_equals_the_full_forward(family, side, tokenizer):
    """For every k: the suffix on block k's input gives the backbone's pooled and per-token
    features, under both paddings; it holds the backbone's parameters under the same names."""
    torch.manual_seed(0)
    backbone = HFDecoder.from_config(tiny_config(family, tokenizer), tokenizer=tokenizer).eval()
    tokenizer.padding_side = side
    try:
        batch = dict(tokenizer(["the flight was late again", "great crew", "no"], padding=True,
                               return_tensors="pt", return_token_type_ids=False))
    finally:
        tokenizer.padding_side = "right"
    with torch.no_grad():
        want, want_tokens = backbone(batch), backbone.token_features(batch)
    mask = batch["attention_mask"]
    for k in range(1, len(backbone.blocks)):
        suffix = FromBlock(backbone, k)
        assert list(suffix.state_dict()) == list(backbone.state_dict())
        assert [id(p) for p in suffix.parameters()] == [id(p) for p in backbone.parameters()]
        x = backbone.block_input(block_output(backbone, k, batch), batch)
        with torch.no_grad():
            torch.testing.assert_close(suffix(x), want, rtol=1e-5, atol=1e-5)
            got_tokens = suffix.token_features(x)
        real = mask.bool()
        torch.testing.assert_close(got_tokens[real], want_tokens[real], rtol=1e-5, atol=1e-5)
        # the model's own layer list is back in place
        assert list(backbone.model.modules()) == list(suffix.model.modules())
        with torch.no_grad():
            torch.testing.assert_close(backbone(batch), want)
