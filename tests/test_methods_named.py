"""Methods are named by their config key (issue 25, item 3): two instances of one class both
work, and a method's statistics are cached under all its settings unless it excludes some."""

from __future__ import annotations

import csv

import pytest
import torch

from transferlab.cache import StageCache
from transferlab.experiment import run_experiment
from transferlab.method import Method, MethodContext
from transferlab.regularizers.base import Regularizer
from transferlab.regularizers.bss import BSS
from transferlab.regularizers.ewc import EWC
from transferlab.stage_store import method_statistics


def target_rows(run_dir) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "csv" / "target" / "metrics.csv")))


def test_two_instances_of_one_loss_term_both_count(make_cfg, tmp_path):
    """regularizer=bss plus an extra bss under the key bss2: two loss terms, each logged under its
    own name, and the training loss holds both (keyed by the file name, one was dropped)."""
    cfg = make_cfg("regularizer=bss", "regularizer.eta=0.5", "+regularizer@extra_regularizers.bss2=bss",
                   "extra_regularizers.bss2.eta=0.25", "source=scratch", "target.epochs=1",
                   "trainer.log_every_n_steps=1", "data.target_train_size=64", "target.batch_size=32")
    run_experiment(cfg, tmp_path / "run")
    rows = [r for r in target_rows(tmp_path / "run") if r.get("target/bss_loss")]
    assert rows and all(r.get("target/bss2_loss") for r in rows)
    for r in rows:
        first, second = float(r["target/bss_loss"]), float(r["target/bss2_loss"])
        assert first > 0 and second == pytest.approx(first / 2, rel=1e-5)  # same features, eta 0.5 vs 0.25


def test_two_penalties_of_one_class_are_logged_apart(make_cfg, tmp_path):
    cfg = make_cfg("regularizer=l2sp", "+regularizer@extra_regularizers.l2sp_strong=l2sp",
                   "extra_regularizers.l2sp_strong.alpha=1.0", "source.epochs=1", "target.epochs=1",
                   "trainer.log_every_n_steps=1")
    run_experiment(cfg, tmp_path / "run")
    rows = target_rows(tmp_path / "run")
    assert any(r.get("target/penalty") for r in rows) and any(r.get("target/l2sp_strong_penalty") for r in rows)


def test_a_method_is_named_by_its_key():
    main, extra = BSS(), BSS()
    extra.name = "bss2"
    assert (main.name, extra.name) == ("bss", "bss2")
    assert (main.penalty_key, extra.penalty_key) == ("penalty", "bss2_penalty")
    assert main.state_key != extra.state_key  # their checkpoint states stay apart


class Forgetful(Regularizer):
    """A new method whose author declared statistics but no settings: its statistics depend on
    `examples`, which nobody listed."""

    statistics_inputs = ("source_model",)

    def __init__(self, examples: int = 10, lam: float = 1.0):
        self.examples, self.lam = examples, lam
        self.computed = 0

    def compute_statistics(self, ctx):
        self.computed += 1
        return {"value": torch.arange(float(self.examples))}

    def use_statistics(self, stats, ctx):
        self.value = stats["value"]


class Careful(Forgetful):
    statistics_excluded = ("lam",)


def statistics_of(method, cache) -> bool | None:
    method.statistics_inputs = ()  # no source model or data to key: the method's settings alone
    return method_statistics(None, None, method, MethodContext(backbone=torch.nn.Linear(1, 1)), cache)


def test_statistics_are_keyed_by_every_setting_by_default(tmp_path):
    cache = StageCache(tmp_path / "cache")
    assert statistics_of(Forgetful(examples=10), cache) is False
    other = Forgetful(examples=20)
    assert statistics_of(other, cache) is False, "another setting shared the cache entry"
    assert len(other.value) == 20
    assert statistics_of(Forgetful(examples=20, lam=3.0), cache) is False  # lam not excluded: its own entry
    assert statistics_of(Careful(examples=10, lam=1.0), cache) is False
    assert statistics_of(Careful(examples=10, lam=3.0), cache) is True  # excluded: shared


def test_settings_are_resolved_init_arguments():
    assert Forgetful(examples=5).statistics_settings() == {"examples": 5, "lam": 1.0}
    assert Careful(lam=2.0).statistics_settings() == {"examples": 10}
    assert EWC(lam=3.0, seed=1).statistics_settings() == {"fisher": False}  # lam and normalize act after
    assert EWC(lam=3.0, fisher=True, seed=1).statistics_settings() == {"fisher": True, "seed": 1}  # draws labels


def test_a_method_may_only_exclude_settings():
    with pytest.raises(TypeError, match="statistics_excluded"):
        class Overrides(Method):  # noqa: F841
            def statistics_settings(self) -> dict:
                return {}

    class Typo(Forgetful):
        statistics_excluded = ("lamb",)

    with pytest.raises(TypeError, match="names no argument"):
        Typo().statistics_settings()
