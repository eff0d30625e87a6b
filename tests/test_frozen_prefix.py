"""Frozen blocks computed once: a target stage with the cache gives the same weights and test
predictions as without it (CNN `partial`, MiniLM linear probe and `partial`), and the cache is used
only where exact."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from conftest import compose_config
from transferlab.backbones.cnn import SmallCNN
from transferlab.data.loaders import make_loader
from transferlab.experiment import run_experiment
from transferlab.tasks import outputs
from transferlab.stages.frozen_prefix import FromBlock, frozen_prefix_length, frozen_prefix_stage
from transferlab.stages.module import TaskModule

USED = "computed once"


def target_weights(run_dir):
    saved = torch.load(run_dir / "checkpoints" / "target.pt", map_location="cpu", weights_only=True)
    return {**{f"backbone.{k}": v for k, v in saved["backbone"].items()}, **{f"head.{k}": v for k, v in saved["head"].items()}}


def assert_same_runs(with_cache, without, tol=1e-5):
    a, b = target_weights(with_cache), target_weights(without)
    assert set(a) == set(b)
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=name)


def test_frozen_prefix_is_the_leading_run_of_frozen_blocks():
    assert frozen_prefix_length(set()) == 0
    assert frozen_prefix_length({0, 1, 3}) == 2
    assert frozen_prefix_length({1, 2}) == 0


def test_from_block_has_the_backbones_parameters_and_names():
    backbone = SmallCNN((1, 8, 8), channels=[4, 6])
    suffix = FromBlock(backbone, 1)
    assert [id(p) for p in suffix.parameters()] == [id(p) for p in backbone.parameters()]
    assert list(suffix.state_dict()) == list(backbone.state_dict())
    x = torch.rand(5, 1, 8, 8)
    backbone.eval()
    torch.testing.assert_close(suffix(backbone.blocks[0](x)), backbone(x))


def test_cnn_partial_with_and_without_the_cache_train_the_same(make_cfg, tmp_path, caplog):
    overrides = ["source=scratch", "freeze=partial", "freeze.k=1", "backbone.channels=[8,16,16]"]
    with caplog.at_level(logging.INFO, logger="transferlab.stages.frozen_prefix"):
        on = run_experiment(make_cfg(*overrides), tmp_path / "on")["metrics"]
    assert USED in caplog.text
    off = run_experiment(make_cfg(*overrides, "target.cache_frozen_blocks=false"), tmp_path / "off")["metrics"]
    assert_same_runs(tmp_path / "on", tmp_path / "off")
    assert on["target/test_acc"] == off["target/test_acc"] and on["target/best_epoch"] == off["target/best_epoch"]


def tweets_cfg(tmp_path, *overrides):
    return compose_config([
        "experiment=tweets_domain_shift", "logger=csv", f"paths.output_root={tmp_path / 'outputs'}",
        "backbone.num_layers=1", "source=pretrained", "data.target_train_size=48",
        "data.val_fraction=0.005", "data.test_fraction=0.005", "data.max_length=32",
        "target.epochs=2", "target.batch_size=16", *overrides])


def test_the_stage_cache_keeps_block_outputs_for_the_next_job(make_cfg, tmp_path):
    """A second job from the same blocks and inputs takes the outputs from the stage cache (a
    different learning rate: the key has no target settings) and trains exactly as if it had
    computed them; different start weights (another scratch seed) or inputs miss."""
    overrides = ["source=scratch", "freeze=linear_probe", "backbone.channels=[8,16,16]", "cache.dir=" + str(tmp_path / "c")]
    first = run_experiment(make_cfg(*overrides), tmp_path / "a")["metrics"]
    again = run_experiment(make_cfg(*overrides, "target.lr=3e-3"), tmp_path / "b")["metrics"]
    same = run_experiment(make_cfg(*overrides), tmp_path / "c1")["metrics"]
    assert (first["cache/frozen_blocks_hit"], again["cache/frozen_blocks_hit"], same["cache/frozen_blocks_hit"]) == (
        False, True, True)
    for name, a in target_weights(tmp_path / "a").items():
        assert torch.equal(a, target_weights(tmp_path / "c1")[name]), name
    assert first["target/test_acc"] == same["target/test_acc"]
    other_seed = run_experiment(make_cfg(*overrides, "seed=1"), tmp_path / "d")["metrics"]
    assert other_seed["cache/frozen_blocks_hit"] is False
    entries = list((tmp_path / "c" / "frozen_blocks").glob("*/outputs.pt"))
    assert len(entries) == 2
    saved = torch.load(entries[0], weights_only=True)
    assert saved["train"].shape == (first["data/target_train_size"], 16)  # pooled features


def test_no_stage_cache_no_entry(make_cfg, tmp_path, caplog):
    """cache=off: the frozen blocks' outputs are still computed once, kept in memory for this stage
    (hit null, neither taken from nor kept in a stage cache), and nothing is written to disk."""
    with caplog.at_level(logging.INFO, logger="transferlab.stages.frozen_prefix"):
        metrics = run_experiment(make_cfg("source=scratch", "freeze=linear_probe", "cache=off"), tmp_path / "a")["metrics"]
    assert metrics["cache/frozen_blocks_hit"] is None
    used = [r.getMessage() for r in caplog.records if USED in r.getMessage()]
    assert used == ["target stage: blocks 0..1 frozen for the whole stage: their output computed once"]
    assert not list(tmp_path.rglob("frozen_blocks"))


@pytest.mark.parametrize("freeze", [["freeze=linear_probe"],
                                    pytest.param(["freeze=partial", "freeze.k=1"], marks=pytest.mark.slow)])
def test_minilm_with_and_without_the_cache_give_the_same_test_predictions(tmp_path, caplog, freeze):
    with caplog.at_level(logging.INFO, logger="transferlab.stages.frozen_prefix"):
        on = run_experiment(tweets_cfg(tmp_path, *freeze), tmp_path / "on")["metrics"]
    assert USED in caplog.text
    off = run_experiment(tweets_cfg(tmp_path, *freeze, "target.cache_frozen_blocks=false"), tmp_path / "off")["metrics"]
    assert_same_runs(tmp_path / "on", tmp_path / "off", tol=1e-4)
    assert on["target/test_acc"] == off["target/test_acc"] and on["target/test_macro_f1"] == off["target/test_macro_f1"]


# -- where the cache is not exact, it is not used ----------------------------------------------------
def small_task():
    from transferlab.data.splits import TaskSplits

    g = torch.Generator().manual_seed(0)
    split = lambda n: (torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))  # noqa: E731
    return TaskSplits("target", [0, 1, 2], split(20), split(10), split(10))


def test_no_cache_without_a_frozen_prefix_or_under_autocast(make_cfg):
    backbone = SmallCNN((1, 8, 8), channels=[4, 6])
    module = TaskModule(backbone, nn.Linear(backbone.feature_dim, 3), stage="target", lr=1e-3)
    cfg = make_cfg()
    assert frozen_prefix_stage(cfg, module, small_task(), {1}, torch.device("cpu")) is None  # block 0 trains
    cfg.trainer.precision = "bf16-mixed"
    assert frozen_prefix_stage(cfg, module, small_task(), {0, 1}, torch.device("cpu")) is None
    cfg.trainer.precision = "32-true"
    cached, task, hit = frozen_prefix_stage(cfg, module, small_task(), {0}, torch.device("cpu"))
    assert hit is None and task.train[0].shape == (20, 4, 4, 4) and torch.equal(task.test[0], small_task().test[0])
    # every block frozen: the cached value is the pooled feature itself
    cached, task, _ = frozen_prefix_stage(cfg, module, small_task(), {0, 1}, torch.device("cpu"))
    assert task.train[0].shape == (20, backbone.feature_dim) and torch.equal(task.test[0], small_task().test[0])
    # the cached module predicts what the full one does, on the cached inputs
    full = outputs(module, make_loader(small_task().val, 4, shuffle=False))[0].argmax(-1).numpy()
    assert np.array_equal(outputs(cached, make_loader(task.val, 4, shuffle=False))[0].argmax(-1).numpy(), full)
