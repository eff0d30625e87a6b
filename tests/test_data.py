"""Class splits, seeded train/val/test splits, the label budget, and the dataset loaders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config
from transferlab.data import make_transfer_data
from transferlab.data.fashion_mnist import load_fashion_mnist
from transferlab.data.loaders import make_loader
from transferlab.errors import ConfigError, TransferlabError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def split(overrides=(), seed=0, with_source=True):
    cfg = compose_config(list(overrides))
    return make_transfer_data(instantiate(cfg.data.dataset), cfg.data, seed=seed, with_source=with_source)


def rows(t: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in t}


def test_digits_class_split_is_disjoint_and_relabelled():
    data = split()
    assert data.source.classes == [0, 1, 2, 3, 4] and data.target.classes == [5, 6, 7, 8, 9]
    for task in (data.source, data.target):
        for x, y in (task.train, task.val, task.test):
            assert set(y.tolist()) == set(range(5)) and x.shape[1:] == (1, 8, 8)
        # train / val / test never share an image
        tr, va, te = rows(task.train[0]), rows(task.val[0]), rows(task.test[0])
        assert not (tr & va) and not (tr & te) and not (va & te)
    # 1797 digits, about half per task, 20% test, 15% of the rest val
    n_target = sum(data.target.sizes().values())
    assert 850 < n_target < 950
    assert abs(data.target.sizes()["test"] - 0.2 * n_target) <= 1


def test_target_labels_are_the_right_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    lookup = {(img / 16.0).astype(np.float32).tobytes(): label for img, label in zip(digits.images, digits.target)}
    data = split(["data.target_classes=[9,5]"], with_source=False)
    x, y = data.target.train
    originals = [lookup[img.numpy()[0].tobytes()] for img in x]
    assert [data.target.classes[i] for i in y.tolist()] == originals  # label 0 means digit 9


def test_label_budget_is_exact_and_stratified():
    data = split(["data.target_train_size=50"])
    assert data.target.sizes()["train"] == 50
    assert np.bincount(data.target.train[1].numpy()).tolist() == [10] * 5
    assert data.source.sizes()["train"] > 500  # the budget is on the target only


def test_splits_follow_the_seed_including_zero():
    a, b, c = split(seed=0), split(seed=0), split(seed=1)
    assert torch.equal(a.target.train[0], b.target.train[0])
    assert not torch.equal(a.target.train[0], c.target.train[0])
    fixed = split(["data.split_seed=7"], seed=0), split(["data.split_seed=7"], seed=3)
    assert torch.equal(fixed[0].target.test[0], fixed[1].target.test[0])


def test_test_size_caps_each_test_split_seeded_and_leaves_the_other_splits_alone():
    full, capped = split(), split(["data.test_size=60"])
    for a, b in ((full.source, capped.source), (full.target, capped.target)):
        assert b.sizes()["test"] == 60 and np.bincount(b.test[1].numpy()).tolist() == [12] * 5  # stratified
        assert rows(b.test[0]) < rows(a.test[0])  # a subset of the full test split
        assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.val[0], b.val[0])
    again, other_seed = split(["data.test_size=60"]), split(["data.test_size=60"], seed=1)
    assert torch.equal(again.target.test[0], capped.target.test[0])
    assert not torch.equal(other_seed.target.test[0], capped.target.test[0])
    assert torch.equal(split(["data.test_size=100000"]).target.test[0], full.target.test[0])  # larger: all
    with pytest.raises(ConfigError, match=r"data.test_size=0: must be >= 1"):
        from transferlab.config import validate
        validate(compose_config(["data.test_size=0"]))


def test_budget_larger_than_data_names_the_key():
    with pytest.raises(ConfigError, match=r"data.target_train_size=5000 exceeds the \d+ target"):
        split(["data.target_train_size=5000"])


def test_absent_class_names_the_key():
    with pytest.raises(ConfigError, match="data.target_classes: class 12 has no examples"):
        split(["data.target_classes=[5,12]"])


def test_loader_is_seeded_and_covers_every_example_once():
    x = torch.arange(100).float()[:, None]
    y = torch.arange(100)
    order = lambda seed: torch.cat([b[1] for b in make_loader((x, y), 32, shuffle=True, seed=seed)])  # noqa: E731
    assert sorted(order(0).tolist()) == list(range(100))
    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))
    assert [len(b[1]) for b in make_loader((x, y), 32, shuffle=False)] == [32, 32, 32, 4]


def write_idx(root: Path, n_train=12, n_test=6):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(np.array([0, 0, 8, 3], dtype=np.uint8).tobytes() + np.array([n, 28, 28], dtype=">i4").tobytes()
                    + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(np.array([0, 0, 8, 1], dtype=np.uint8).tobytes() + np.array([n], dtype=">i4").tobytes()
                    + labels.tobytes())
    return images, labels


def test_fashion_idx_parser_reads_what_was_written(tmp_path):
    images, labels = write_idx(tmp_path)
    pool = load_fashion_mnist(str(tmp_path))
    assert pool.x_train.shape == (12, 1, 28, 28) and pool.x_test.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(pool.y_test, labels)
    np.testing.assert_allclose(pool.x_test[:, 0], images / 255.0, rtol=1e-6)


def test_fashion_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(TransferlabError) as info:
        load_fashion_mnist(str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "paths.fashion_mnist" in message
    assert "\n" not in message


def test_fashion_corrupt_file_names_it(tmp_path):
    write_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(TransferlabError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(str(tmp_path))


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist (.ci/run does)")
def test_real_fashion_mnist_split():
    data = split(["data=fashion_mnist"])
    assert data.target.sizes()["train"] == 500 and data.source.sizes()["train"] == 10000
    assert data.target.sizes()["test"] == 5000  # the official test split: 1,000 per class
    assert data.input_shape == (1, 28, 28)
    assert 0.0 <= float(data.target.train[0].min()) and float(data.target.train[0].max()) <= 1.0
