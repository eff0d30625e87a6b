"""Your own data through Hugging Face `datasets` (data=hf): CSV texts, an image folder, a JSONL NER
file and a save_to_disk folder, made here in temp dirs; their splits, labels, cache keys and the
one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_completes_or_refuses, compose_config, options
from PIL import Image

from transferlab.data.hf import ImageColumn, load_hf
from transferlab.data.splits import make_transfer_data
from transferlab.errors import ConfigError, DataError, TransferlabError
from transferlab.experiment import run_experiment

REVIEWS = [("loved every minute of it", "positive"), ("a total waste of money", "negative"),
           ("great value, would buy again", "positive"), ("it broke after a day", "negative"),
           ("fine, nothing special", "neutral"), ("does what it says", "neutral")]


def write_csv(path: Path, rows: int = 60) -> Path:
    lines = ["review,sentiment"] + [f'"{REVIEWS[i % 6][0]} #{i}",{REVIEWS[i % 6][1]}' for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_image_folder(root: Path, per_class: int = 12, classes=("cat", "dog", "fox"), size=(20, 16)) -> Path:
    """Class sub-folders of JPEGs and PNGs; one class's images are grayscale, some RGBA."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((size[1], size[0], 3)) * 80 + 80 * c).astype(np.uint8)
            image = Image.fromarray(pixels)
            if name == "dog":
                image = image.convert("L")  # grayscale mixed with RGB
            elif name == "fox" and i % 2:
                image = image.convert("RGBA")
            image.save(root / name / f"{i}.{'png' if image.mode != 'RGB' else 'jpg'}")
    return root


def write_ner_jsonl(path: Path, rows: int = 40) -> Path:
    sentences = [(["Alice", "flew", "to", "Paris"], ["B-person", "O", "O", "B-geo"]),
                 (["I", "love", "New", "York"], ["O", "O", "B-geo", "I-geo"]),
                 (["Bob", "met", "Carol", "today"], ["B-person", "O", "B-person", "O"])]
    with path.open("w") as f:
        for i in range(rows):
            words, tags = sentences[i % 3]
            f.write(json.dumps({"tokens": words, "ner_tags": tags}) + "\n")
    return path


def data_cfg(**overrides):
    cfg = compose_config(["data=hf", "source=pretrained"])
    for key, value in overrides.items():
        cfg.data[key] = value
    return cfg.data


# -- loading and splitting ----------------------------------------------------------------------
def test_csv_labels_are_the_sorted_distinct_values_and_splits_are_seeded(tmp_path):
    pool = load_hf(builder="csv", data_files=str(write_csv(tmp_path / "reviews.csv")), input_column="review",
                   label_column="sentiment")
    assert pool.is_text and pool.class_names == ["negative", "neutral", "positive"]
    assert pool.x_train[0] == "loved every minute of it #0" and pool.y_train[0] == 2
    assert pool.x_val is None and pool.x_test is None  # one file: seeded cuts of it
    a = make_transfer_data(pool, data_cfg(), seed=0, with_source=False)
    b = make_transfer_data(pool, data_cfg(), seed=0, with_source=False)
    assert sorted(a.target.sizes().values()) == sorted([10, 5, 45]) or sum(a.target.sizes().values()) == 60
    assert list(a.target.train[0]) == list(b.target.train[0])
    every = set(a.target.train[0]) | set(a.target.val[0]) | set(a.target.test[0])
    assert len(every) == 60  # each review in exactly one split


def test_the_datasets_own_validation_and_test_splits_are_used_as_given(tmp_path):
    files = {split: str(write_csv(tmp_path / f"{split}.csv", rows)) for split, rows in
             [("train", 30), ("validation", 12), ("test", 18)]}
    pool = load_hf(builder="csv", data_files=files, input_column="review", label_column="sentiment")
    data = make_transfer_data(pool, data_cfg(), seed=3, with_source=False)
    assert data.target.sizes() == {"train": 30, "val": 12, "test": 18}
    assert list(data.target.val[0]) == list(pool.x_val)  # as given, in order, never re-cut
    budget = make_transfer_data(pool, data_cfg(target_train_size=9), seed=3, with_source=False)
    assert budget.target.sizes() == {"train": 9, "val": 12, "test": 18}
    assert set(budget.target.train[0]) <= set(pool.x_train)


def test_image_folder_stays_on_disk_and_decodes_per_batch_to_rgb(tmp_path):
    pool = load_hf(builder="imagefolder", data_dir=str(write_image_folder(tmp_path / "animals")), image_size=12)
    assert isinstance(pool.x_train, ImageColumn) and pool.class_names == ["cat", "dog", "fox"]
    assert pool.input_shape == (3, 12, 12) and not pool.is_text
    data = make_transfer_data(pool, data_cfg(), seed=0, with_source=False)
    x, y = data.target.train
    assert isinstance(x, ImageColumn) and len(x) == len(y)
    batch = x[[0, 1, 2]]
    assert batch.shape == (3, 3, 12, 12) and batch.dtype == torch.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0
    # a grayscale dog comes back as three equal channels
    dog = int(np.flatnonzero(y.numpy() == 1)[0])
    gray = x[[dog]][0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    # the decoded pixels are the file's, resized as PIL resizes it
    path = x.dataset[int(x.rows[dog])][x.column]["path"]
    want = np.asarray(Image.open(path).convert("RGB").resize((12, 12), Image.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_allclose(gray.permute(1, 2, 0).numpy(), want, atol=1e-6)


def test_ner_jsonl_tags_become_token_labels(tmp_path):
    pool = load_hf(builder="json", data_files=str(write_ner_jsonl(tmp_path / "ner.jsonl")), words_column="tokens",
                   tags_column="ner_tags")
    assert pool.token_labels and pool.class_names == ["B-geo", "B-person", "I-geo", "O"]
    assert pool.x_train[1] == ("I", "love", "New", "York")
    assert list(pool.y_train[1]) == [3, 3, 0, 2]


def test_save_to_disk_folder_with_class_label_and_domains(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["no", "yes"]),
                                  "site": datasets.Value("string")})
    rows = {"text": [f"text {i}" for i in range(40)], "label": [i % 2 for i in range(40)],
            "site": ["forum" if i < 20 else "news" for i in range(40)]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    pool = load_hf(from_disk=str(tmp_path / "saved"), domain_column="site")
    assert pool.class_names == ["no", "yes"] and pool.domain_names == ["forum", "news"]
    cfg = data_cfg(source_classes=[0, 1], target_classes=[0, 1], source_domains=["forum"], target_domains=["news"])
    data = make_transfer_data(pool, cfg, seed=0, with_source=True)
    assert all(int(t.split()[1]) < 20 for t in data.source.train[0])
    assert all(int(t.split()[1]) >= 20 for t in data.target.train[0])


# -- the stage cache names the data by content ----------------------------------------------------
def test_an_edited_csv_is_a_new_cache_key(tmp_path):
    from transferlab.stage_store import target_data_settings

    path = write_csv(tmp_path / "reviews.csv")
    cfg = compose_config(["data=hf", "source=pretrained", "data.dataset.builder=csv", f"data.dataset.data_files={path}",
                          "data.dataset.input_column=review", "data.dataset.label_column=sentiment"])

    def key():
        pool = load_hf(builder="csv", data_files=str(path), input_column="review", label_column="sentiment")
        return target_data_settings(cfg, make_transfer_data(pool, cfg.data, seed=0, with_source=False)), pool

    before, _ = key()
    assert key()[0] == before
    path.write_text(path.read_text().replace("waste", "misuse"))
    os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock does
    after, pool = key()
    assert after["content"] != before["content"]
    assert any("misuse" in text for text in pool.x_train)  # and the data read is the edited file's


# -- bad input: one line each --------------------------------------------------------------------
def test_bad_input_is_refused_in_one_line(tmp_path):
    csv = str(write_csv(tmp_path / "reviews.csv"))
    cases = [
        (dict(builder="csv", data_files=csv, input_column="body", label_column="sentiment"),
         ConfigError, "input_column=body: no such column; the dataset's columns are review, sentiment"),
        (dict(builder="csv", data_files=str(tmp_path / "nothing*.csv")), ConfigError, "matches no file"),
        (dict(builder="csv", data_files=csv, input_column="review", label_column="stars"), ConfigError,
         "label_column=stars: no such column"),
        (dict(), ConfigError, "set data.dataset.builder"),
        (dict(from_disk=str(tmp_path / "missing")), ConfigError, "is not a folder"),
        (dict(builder="stanfordnlp/imdb"), ConfigError, "HF_HUB_OFFLINE=1: it is not in the local HF cache"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message) as raised:
            load_hf(**kwargs)
        assert "\n" not in str(raised.value)
    gaps = tmp_path / "gaps.csv"
    gaps.write_text("review,sentiment\ngood,positive\nbad,\nok,neutral\n")
    with pytest.raises(DataError, match="column 'sentiment' has 1 missing value"):
        load_hf(builder="csv", data_files=str(gaps), input_column="review", label_column="sentiment")


def test_an_image_that_cannot_be_decoded_is_named(tmp_path):
    root = write_image_folder(tmp_path / "animals", per_class=3)
    (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    pool = load_hf(builder="imagefolder", data_dir=str(root), image_size=8)
    broken = next(i for i in range(len(pool.x_train))
                  if pool.x_train.dataset[int(pool.x_train.rows[i])]["image"]["path"].endswith("broken.jpg"))
    with pytest.raises(DataError, match=r"cannot decode .*broken\.jpg.*remove or replace the file"):
        pool.x_train[[broken]]


def test_a_class_missing_from_a_given_split_is_refused(tmp_path):
    write_csv(tmp_path / "train.csv", 30)
    (tmp_path / "test.csv").write_text("review,sentiment\ngood,positive\nbad,negative\n")  # no neutral
    pool = load_hf(builder="csv", data_files={"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")},
                   input_column="review", label_column="sentiment")
    with pytest.raises(ConfigError, match=r"class 1 \('neutral'\) has no examples in the test split"):
        make_transfer_data(pool, data_cfg(), seed=0, with_source=False)


def test_images_with_a_text_encoder_are_refused_before_training(make_cfg, tmp_path):
    root = write_image_folder(tmp_path / "animals", per_class=4)
    cfg = make_cfg("data=hf", "source=pretrained", "data.dataset.builder=imagefolder", f"data.dataset.data_dir={root}",
                   "backbone=minilm", "backbone.num_layers=1")
    with pytest.raises(TransferlabError, match="is not text but backbone .* is a text encoder"):
        run_experiment(cfg, tmp_path / "run")


# -- end to end ---------------------------------------------------------------------------------
def test_image_folder_runs_end_to_end_with_workers_and_augmentation(make_cfg, tmp_path):
    root = write_image_folder(tmp_path / "animals", per_class=16)
    cfg = make_cfg("data=hf", "source=scratch", "data.dataset.builder=imagefolder", f"data.dataset.data_dir={root}",
                   "data.dataset.image_size=16", "data.num_workers=2", "data.augment=true", "evaluate.wise_ft_alphas=[]")
    m = run_experiment(cfg, tmp_path / "run")["metrics"]
    assert m["data/target_train_size"] + m["data/target_val_size"] + m["data/target_test_size"] == 48
    assert 0.0 <= m["target/test_acc"] <= 1.0


def test_a_linear_probe_on_images_on_disk_keeps_their_features_in_the_stage_cache(make_cfg, tmp_path):
    root = write_image_folder(tmp_path / "animals", per_class=10)
    runs = [run_experiment(make_cfg("data=hf", "source=scratch", "data.dataset.builder=imagefolder",
                                    f"data.dataset.data_dir={root}", "data.dataset.image_size=8", "freeze=linear_probe",
                                    "evaluate.transferability=false", f"target.lr={lr}"), tmp_path / f"run{i}")["metrics"]
            for i, lr in enumerate(["1e-2", "3e-2"])]
    assert [m["cache/frozen_blocks_hit"] for m in runs] == [False, True]  # keyed by the images' identity


def transferlab(*args, cwd: Path):
    env = {**os.environ, "TRANSFERLAB_OUTPUT": str(cwd / "out"), "TRANSFERLAB_CACHE": str(cwd / "out" / "cache"),
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "transferlab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def completed(result, cwd: Path) -> dict:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in (cwd / "out").rglob("results.json")]
    assert len(runs) == 1 and runs[0]["status"] == "completed"
    return runs[0]["metrics"]


@pytest.mark.slow  # three end-to-end CLI runs in subprocesses (MiniLM): CI runs them (.ci/run)
def test_the_three_kinds_of_own_data_run_through_the_cli(tmp_path):
    """What a user types: a CSV of reviews, an image folder, a JSONL NER file, each made here."""
    csv = tmp_path / "csv"
    csv.mkdir()
    write_csv(csv / "reviews.csv", 90)
    m = completed(transferlab("data=hf", "data.dataset.builder=csv", "data.dataset.data_files=reviews.csv",
                              "data.dataset.input_column=review", "data.dataset.label_column=sentiment",
                              "backbone=minilm", "backbone.num_layers=1", "source=pretrained", "target.epochs=1",
                              "logger=csv", cwd=csv), csv)
    assert m["target/test_acc"] is not None and m["transferability/logme"] is not None

    images = tmp_path / "images"
    write_image_folder(images / "animals", per_class=16)
    m = completed(transferlab("data=hf", "data.dataset.builder=imagefolder", "data.dataset.data_dir=animals",
                              "data.dataset.image_size=32", "backbone=efficientnet_lite0", "source=pretrained",
                              "target.epochs=1", "logger=csv", cwd=images), images)
    assert m["target/test_acc"] is not None

    ner = tmp_path / "ner"
    ner.mkdir()
    write_ner_jsonl(ner / "ner.jsonl", 60)
    m = completed(transferlab("data=hf", "data.dataset.builder=json", "data.dataset.data_files=ner.jsonl",
                              "data.dataset.words_column=tokens", "data.dataset.tags_column=ner_tags",
                              "backbone=minilm", "backbone.num_layers=1", "source=pretrained", "target.epochs=1",
                              "logger=csv", cwd=ner), ner)
    assert m["target/test_f1"] is not None

    missing = transferlab("data=hf", "data.dataset.builder=csv", "data.dataset.data_files=nope.csv",
                          "backbone=minilm", "source=pretrained", cwd=csv)
    assert missing.returncode != 0
    assert "data.dataset.data_files: 'nope.csv' matches no file" in missing.stderr


def test_the_python_way_a_function_returning_a_dataset(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(
        "import datasets\n"
        "def reviews():\n"
        "    rows = {'text': [f'review {i}' for i in range(30)], 'label': ['bad', 'good', 'ok'] * 10}\n"
        "    return datasets.Dataset.from_dict(rows)\n")
    monkeypatch.chdir(tmp_path)
    pool = load_hf(from_function="my_data.reviews")
    assert pool.class_names == ["bad", "good", "ok"] and len(pool.x_train) == 30 and pool.name == "my_data.reviews"
    with pytest.raises(ConfigError, match="from_function=my_data.nothing: cannot import it"):
        load_hf(from_function="my_data.nothing")


def test_a_decoding_error_in_a_loader_worker_reaches_the_user_as_its_own_line(tmp_path):
    from transferlab.data.loaders import make_loader
    from transferlab.experiment import one_line

    root = write_image_folder(tmp_path / "animals", per_class=2)
    (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    pool = load_hf(builder="imagefolder", data_dir=str(root), image_size=8)
    with pytest.raises(DataError) as raised:
        list(make_loader((pool.x_train, torch.from_numpy(pool.y_train)), 16, shuffle=False, num_workers=1))
    assert one_line(raised.value).startswith("data: cannot decode ") and "broken.jpg" in one_line(raised.value)


def test_text_is_tokenized_through_datasets_map_and_cached_on_disk(tmp_path):
    from transferlab.backbones.minilm import MiniLM
    from transferlab.data import hf
    from transferlab.data.text import tokenize

    pool = load_hf(builder="csv", data_files=str(write_csv(tmp_path / "reviews.csv", 40)), input_column="review",
                   label_column="sentiment")
    tokenizer = MiniLM(num_layers=1).tokenizer
    view = pool.x_train.take(np.array([5, 0, 17, 33]))
    mapped = tokenize(view, tokenizer, max_length=6)
    direct = tokenizer(list(view), truncation=True, max_length=6, padding="longest", return_token_type_ids=False,
                       return_tensors="pt")
    assert torch.equal(mapped.input_ids, direct["input_ids"]) and torch.equal(mapped.attention_mask,
                                                                              direct["attention_mask"])
    (cached,) = hf._TOKENIZED.values()
    files = [f["filename"] for f in cached.cache_files]
    assert files and all(Path(f).is_file() for f in files)  # written beside the dataset's own Arrow files
    hf._TOKENIZED.clear()  # a new run: the same data and tokenizer read the mapped table back
    again = load_hf(builder="csv", data_files=str(tmp_path / "reviews.csv"), input_column="review",
                    label_column="sentiment").x_train.take(np.array([5, 0, 17, 33]))
    assert torch.equal(tokenize(again, tokenizer, max_length=6).input_ids, mapped.input_ids)
    assert [f["filename"] for f in next(iter(hf._TOKENIZED.values())).cache_files] == files


@pytest.mark.slow  # 17 short runs: images on disk under every freeze policy and regularizer (CI runs them)
@pytest.mark.parametrize("group, option", [("freeze", o) for o in options("freeze")]
                         + [("regularizer", o) for o in options("regularizer")])
def test_every_freeze_policy_and_regularizer_composes_with_images_on_disk(make_cfg, tmp_path_factory, tmp_path,
                                                                          group, option):
    root = tmp_path_factory.getbasetemp() / "combinations"
    if not root.exists():
        write_image_folder(root, per_class=10, classes=("cat", "dog", "fox", "owl"))
    cfg = make_cfg("data=hf", "data.dataset.builder=imagefolder", f"data.dataset.data_dir={root}",
                   "data.dataset.image_size=8", "data.source_classes=[0,1]", "data.target_classes=[2,3]",
                   "data.num_workers=0", f"{group}={option}", "source.epochs=1", "target.epochs=2",
                   *(["freeze.probe_epochs=1"] if option == "lp_ft" else []))  # LP-FT: 1 probe + 1 full epoch
    assert_completes_or_refuses(cfg, tmp_path / "run")
