"""Token classification on WNUT-16: the data, labels aligned to sub-tokens with the real MiniLM
tokenizer, entity-level scoring, and a whole run with a 1-layer MiniLM on a tiny subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import compose_config
from transferlab.backbones.minilm import MiniLM
from transferlab.data import make_transfer_data
from transferlab.data.loaders import make_loader
from transferlab.data.text import tokenize_words
from transferlab.data.wnut import TAG_NAMES, load_wnut16_ner
from transferlab.errors import ConfigError
from transferlab.experiment import run_experiment
from transferlab.results import read_results
from transferlab.tasks import entity_scores

X = -100  # not scored


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return MiniLM(num_layers=1).eval()


def tag(name: str) -> int:
    return TAG_NAMES.index(name)


def test_wnut_pool_reads_every_tweet_and_tag():
    pool = load_wnut16_ner()
    assert pool.token_labels and pool.is_text and len(TAG_NAMES) == 21
    assert len(pool.x_train) == 2394  # whitespace-only lines separate the tweets
    assert sum(len(y) for y in pool.y_train) == 46_469  # one tag per non-blank line
    first = pool.x_train[0]
    assert first[:3] == ("@paulwalk", "It", "'s")
    assert [TAG_NAMES[t] for t in pool.y_train[0][first.index("Empire"):][:3]] == ["B-facility", "I-facility", "I-facility"]


def test_split_is_seeded_disjoint_and_budgeted():
    pool = load_wnut16_ner()
    cfg = compose_config(["data=wnut16_ner", "data.target_train_size=100"])
    data = make_transfer_data(pool, cfg.data, seed=0, with_source=False)
    again = make_transfer_data(pool, cfg.data, seed=0, with_source=False)
    t = data.target
    assert t.token_level and t.label_names == TAG_NAMES and t.sizes()["train"] == 100
    ids = {s: {id(x) for x in getattr(t, s)[0]} for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert list(t.test[0]) == list(again.target.test[0])
    with pytest.raises(ConfigError, match="data.target_classes"):
        make_transfer_data(pool, compose_config(["data=wnut16_ner", "data.target_classes=[0,1]"]).data, seed=0,
                           with_source=False)


def test_labels_align_to_the_first_sub_token(minilm):
    sentences = np.empty(2, dtype=object)
    sentences[:] = [("Empire", "State", "Building", "rocks"), ("@paulwalk", "loves", "Coachella", "!")]
    labels = [np.array([tag("B-facility"), tag("I-facility"), tag("I-facility"), tag("O")]),
              np.array([tag("B-person"), tag("O"), tag("B-other"), tag("O")])]
    tokens, aligned = tokenize_words(sentences, labels, minilm.tokenizer, max_length=32)
    # [CLS] empire state building rocks [SEP] (pad pad pad)
    # [CLS] @ paul ##walk loves coach ##ella ! [SEP]
    expected = [
        [X, tag("B-facility"), tag("I-facility"), tag("I-facility"), tag("O"), X, X, X, X],
        [X, tag("B-person"), X, X, tag("O"), tag("B-other"), X, tag("O"), X],
    ]
    assert aligned.labels.tolist() == expected
    assert tokens.input_ids.shape == aligned.labels.shape
    # a batch cuts labels to the same columns as its tokens
    loader = make_loader((tokens, aligned), batch_size=1, shuffle=False)
    (x, y), _ = list(loader)
    assert x["input_ids"].shape == y.shape == (1, 6) and y.tolist() == [expected[0][:6]]


def test_entity_scores_by_hand():
    true = [["B-person", "I-person", "O", "B-geo-loc"], ["O", "B-company"]]
    # person span exact (TP); geo-loc missed (FN); company predicted as product (FP + FN)
    pred = [["B-person", "I-person", "O", "O"], ["O", "B-product"]]
    s = entity_scores(true, pred)
    assert s["precision"] == pytest.approx(1 / 2) and s["recall"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert s["acc"] == pytest.approx(4 / 6)
    # a span that is cut short is not a hit
    assert entity_scores([["B-person", "I-person"]], [["B-person", "O"]])["f1"] == 0.0


def test_wnut_run_completes_with_entity_scores(tmp_path):
    cfg = compose_config([
        "experiment=wnut_ner", "logger=csv", f"paths.output_root={tmp_path / 'outputs'}", "backbone.num_layers=1",
        "data.target_train_size=64", "data.test_fraction=0.03", "data.val_fraction=0.03", "data.max_length=32",
        "target.epochs=2", "target.batch_size=16", "target.lr=1e-3"])
    run_experiment(cfg, tmp_path / "run")
    results = read_results(tmp_path / "run")
    assert results["status"] == "completed" and results["error"] is None
    m = results["metrics"]
    for key in ("target/test_f1", "target/test_precision", "target/test_recall", "target/val_f1", "target/test_acc"):
        assert 0 <= m[key] <= 1, key
    assert m["source/test_acc_before"] is None and m["target/epochs_run"] == 2
    assert m["params/trainable"] == m["params/total"]  # full fine-tuning: backbone + token head
    assert (tmp_path / "run" / "csv" / "target" / "metrics.csv").is_file()


def test_wnut_with_a_source_stage_names_the_fix(tmp_path):
    cfg = compose_config(["experiment=wnut_ner", "logger=csv", f"paths.output_root={tmp_path / 'o'}",
                          "backbone.num_layers=1", "source=train", "data.source_classes=[21,22]"])
    with pytest.raises(ConfigError, match="source=pretrained or source=scratch"):
        run_experiment(cfg, tmp_path / "run")
