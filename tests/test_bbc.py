"""BBC News topics: the folders read as 2,225 articles with labels in sorted class-name order
(2,127 once duplicates are dropped), and a tiny run of experiment=bbc_topics with a 1-layer MiniLM."""

from __future__ import annotations

import numpy as np

from conftest import compose_config
from transferlab.data import make_transfer_data
from transferlab.data.bbc import default_dir, load_bbc_news
from transferlab.experiment import run_experiment
from transferlab.results import read_results

CLASSES = ["business", "entertainment", "politics", "sports", "tech"]


def folder_texts() -> dict[str, list[str]]:
    """Each class folder's articles, read here independently of the loader (Latin-1 fallback)."""
    def read(raw: bytes) -> str:
        try:
            return raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return raw.decode("latin-1").strip()
    return {d.name: [read(p.read_bytes()) for p in d.glob("*.txt")] for d in default_dir().iterdir() if d.is_dir()}


def test_all_files_with_labels_from_their_sorted_folder():
    pool = load_bbc_news(drop_duplicates=False)
    assert pool.is_text and pool.name == "bbc_news" and len(pool.y_train) == 2225
    assert pool.class_names == CLASSES
    folders = folder_texts()
    assert np.bincount(pool.y_train).tolist() == [len(folders[c]) for c in CLASSES] == [510, 386, 417, 511, 401]
    for label, name in enumerate(CLASSES):  # each label's articles are exactly that folder's files
        assert sorted(t for t, y in zip(pool.x_train, pool.y_train) if y == label) == sorted(folders[name])
    claxton = [y for t, y in zip(pool.x_train, pool.y_train) if t.startswith("Claxton hunting first major medal")]
    assert claxton == [CLASSES.index("sports")]
    assert any("a £15.8m signing from Parma" in t for t in pool.x_train)  # the one Latin-1 file


def test_duplicates_are_dropped_by_default():
    pool = load_bbc_news()
    assert len(pool.y_train) == len(set(pool.x_train)) == 2127
    folders = folder_texts()
    for label, name in enumerate(CLASSES):
        assert set(t for t, y in zip(pool.x_train, pool.y_train) if y == label) == set(folders[name])


def test_class_split_is_disjoint():
    data = make_transfer_data(load_bbc_news(), compose_config(["data=bbc_news"]).data, seed=0)
    assert data.source.classes == [0, 2, 3] and data.target.classes == [1, 4]
    splits = [set(getattr(task, s)[0]) for task in (data.source, data.target) for s in ("train", "val", "test")]
    assert sum(len(s) for s in splits) == len(set().union(*splits)) == 2127  # no text in two splits


def test_bbc_topics_run_completes(tmp_path):
    cfg = compose_config(["experiment=bbc_topics", "logger=csv", f"paths.output_root={tmp_path / 'outputs'}",
                          "backbone.num_layers=1", "data.target_train_size=40", "data.test_fraction=0.02",
                          "data.val_fraction=0.02", "data.max_length=32", "target.epochs=1"])
    run_experiment(cfg, tmp_path / "run")
    results = read_results(tmp_path / "run")
    assert results["status"] == "completed", results["error"]
    m = results["metrics"]
    assert 0 <= m["target/test_acc"] <= 1 and m["data/target_train_size"] == 40 and m["data/target_test_size"] == 43
    assert m["source/test_acc_before"] is None
