"""data.source_dataset and experiment=sentiment_to_ner: the source task (tweet sentiment) comes from
another pool than the target (WNUT-16 NER); one MiniLM carries both, and forgetting is measured on
sentiment. Runs use a 1-layer MiniLM and tiny budgets."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose_config
from transferlab.cache import cache_key
from transferlab.config import validate
from transferlab.data import make_transfer_data
from transferlab.data.tweets import load_tweets_sentiment
from transferlab.data.wnut import TAG_NAMES, load_wnut16_ner
from transferlab.errors import ConfigError
from transferlab.experiment import run_experiment
from transferlab.results import read_results
from transferlab.stage_store import source_settings


def test_source_task_from_its_own_pool():
    cfg = compose_config(["experiment=sentiment_to_ner"])
    validate(cfg)  # source classes [0, 1, 2] vs target tags [0..20]: different pools, no overlap error
    tweets = load_tweets_sentiment()
    data = make_transfer_data(load_wnut16_ner(), cfg.data, seed=0, source_pool=tweets)
    assert data.dataset == "wnut16_ner" and data.source_dataset == "tweets_sentiment" and data.is_text
    assert not data.source.token_level and data.source.classes == [0, 1, 2] and data.source.domains == ["airline"]
    assert data.source.sizes()["train"] == 2000 and set(data.source.test[1].tolist()) == {0, 1, 2}
    airline = {t for t, d in zip(tweets.x_train, tweets.domain_train) if d == 0}
    assert set(data.source.train[0]) <= airline
    assert data.target.token_level and data.target.label_names == TAG_NAMES


def test_source_dataset_must_be_a_classification_pool_of_the_same_kind():
    cfg = compose_config(["experiment=sentiment_to_ner"])
    with pytest.raises(ConfigError, match=r"data=wnut16_ner \(data.source_dataset\) is a single token-classification"):
        make_transfer_data(load_wnut16_ner(), cfg.data, seed=0, source_pool=load_wnut16_ner())
    from transferlab.data.digits import load_digits
    with pytest.raises(ConfigError, match="data.source_dataset: digits holds images .* wnut16_ner holds text"):
        make_transfer_data(load_wnut16_ner(), cfg.data, seed=0, source_pool=load_digits())


def test_source_cache_key_follows_the_source_pool():
    class Text:
        is_text = True

    cfg = compose_config(["experiment=sentiment_to_ner"])
    settings = source_settings(cfg, Text)
    assert settings["dataset"]["_target_"].endswith("load_tweets_sentiment")
    other_target = compose_config(["experiment=sentiment_to_ner", "data.dataset.path=/elsewhere/ner.txt"])
    other_source = compose_config(["experiment=sentiment_to_ner", "data.source_dataset.path=/elsewhere/tweets.csv"])
    assert cache_key(source_settings(other_target, Text)) == cache_key(settings)
    assert cache_key(source_settings(other_source, Text)) != cache_key(settings)

    class Images:
        is_text = False

    # source_dataset null: the key earlier versions wrote for the default run, so their cache entries stay valid
    assert cache_key(source_settings(compose_config(), Images)) == "9d449f7039295fa06799"


def run_cfg(tmp_path, *overrides):
    return compose_config([
        "experiment=sentiment_to_ner", "logger=csv", f"paths.output_root={tmp_path / 'outputs'}",
        "backbone.num_layers=1", "data.source_train_size=48", "data.target_train_size=48",
        "data.test_fraction=0.01", "data.val_fraction=0.01", "data.max_length=32",
        "source.epochs=1", "target.epochs=1", "source.lr=1e-3", "target.lr=1e-3", *overrides])


@pytest.mark.parametrize("regularizer", ["none", pytest.param("ewc", marks=pytest.mark.slow)])
def test_sentiment_to_ner_runs_and_measures_forgetting_on_sentiment(tmp_path, regularizer):
    results = run_experiment(run_cfg(tmp_path, f"regularizer={regularizer}"), tmp_path / "run")
    assert read_results(tmp_path / "run")["status"] == "completed"
    m = results["metrics"]
    for key in ("source/test_acc_before", "source/test_acc_after", "target/test_f1", "target/test_acc"):
        assert 0 <= m[key] <= 1, key
    assert m["transfer/forgetting"] == pytest.approx(m["source/test_acc_before"] - m["source/test_acc_after"])
    assert m["data/source_train_size"] == 48 and m["data/source_test_size"] == math.ceil(0.01 * 14638)  # of the airline tweets (sklearn rounds up)
    if regularizer == "ewc":
        assert m["cache/ewc_statistics_hit"] is False and m["time/ewc_statistics_s"] > 0
    saved = torch.load(tmp_path / "run" / "checkpoints" / "source.pt", weights_only=True)
    assert saved["dataset"] == "tweets_sentiment" and saved["source_classes"] == [0, 1, 2]
