"""One split logic for every dataset: source/target tasks cut by class (digits 0-4 → 5-9) or, when
`data.source_domains` / `target_domains` are given, by domain with the same classes (airline →
other tweets); then seeded train/val/test splits and the label budget. Labels are renumbered
0..k-1 per task, in the order the classes are listed in the config. With `data.source_dataset` the
source task is cut from a second pool (tweet sentiment → WNUT-16 NER) by the same logic."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from transferlab.data.hf import ImageColumn, concatenate, take
from transferlab.data.pool import LabelledPool
from transferlab.errors import ConfigError


@dataclass
class TaskSplits:
    name: str  # "source" or "target"
    classes: list[int]  # original class ids; label i means classes[i]
    # (x, y): x a tensor, or for text first an array of strings, then Tokens (data/text.py)
    train: tuple
    val: tuple
    test: tuple
    domains: list[str] = field(default_factory=list)  # empty: every domain (a class split)
    # Token classification: y is one tag id per word (then per sub-token, after tokenizing);
    # label_names turns ids back into BIO tags for entity-level scoring.
    token_level: bool = False
    label_names: list[str] = field(default_factory=list)
    # An out-of-distribution test split (data.ood_domains / data.ood_shift): the same classes from
    # held-out domains, or the test split under a label-preserving shift. None: none.
    ood_test: Optional[tuple] = None
    # Language modeling: x texts (then Tokens), y the next-token labels once tokenized.
    language_modeling: bool = False

    @property
    def evaluation_splits(self) -> tuple[str, ...]:
        return ("train", "val", "test", "ood_test") if self.ood_test is not None else ("train", "val", "test")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sizes(self) -> dict[str, int]:
        return {split: len(getattr(self, split)[1]) for split in ("train", "val", "test")}


@dataclass
class TransferData:
    source: Optional[TaskSplits]
    target: TaskSplits
    input_shape: tuple[int, ...]
    dataset: str
    is_text: bool = False
    source_dataset: Optional[str] = None  # the pool the source task was cut from (None: no source task)
    # the pools' content fingerprints (data=hf: an edited file is a new key); None: named by config
    fingerprint: Optional[str] = None
    source_fingerprint: Optional[str] = None


def _select(y: np.ndarray, classes: Sequence[int], domain: Optional[np.ndarray] = None, domain_ids: Sequence[int] = ()):
    """(positions, labels 0..k-1) of the examples of `classes` (and of `domain_ids`, if any)."""
    keep = np.isin(y, classes)
    if domain_ids:
        keep &= np.isin(domain, domain_ids)
    remap = {c: i for i, c in enumerate(classes)}
    return np.flatnonzero(keep), np.array([remap[c] for c in y[keep]], dtype=np.int64)


def _split(x, y, fraction_or_size, seed: int):
    """Stratified when every class can be represented, plain random otherwise."""
    n_classes = len(np.unique(y))
    n_held = fraction_or_size if isinstance(fraction_or_size, int) else int(round(fraction_or_size * len(y)))
    stratify = y if min(n_held, len(y) - n_held) >= n_classes and np.bincount(y).min() >= 2 else None
    return train_test_split(x, y, test_size=fraction_or_size, random_state=seed, stratify=stratify)


def _domain_ids(pool: LabelledPool, name: str, domains: list[str]) -> list[int]:
    if not domains:
        return []
    if not pool.domain_names:
        raise ConfigError(f"data.{name}_domains: {pool.name} has no domains; leave it empty (a class split)")
    unknown = [d for d in domains if d not in pool.domain_names]
    if unknown:
        raise ConfigError(f"data.{name}_domains: '{unknown[0]}' is not a domain of {pool.name} "
                          f"(domains: {', '.join(pool.domain_names)})")
    return [pool.domain_names.index(d) for d in domains]


def _classes(pool: LabelledPool, name: str, data_cfg) -> list[int]:
    """data.<name>_classes, null meaning every class of the pool."""
    listed = data_cfg[f"{name}_classes"]
    classes = list(range(len(pool.class_names))) if listed is None else list(listed)
    if len(set(classes)) < 2:
        raise ConfigError(f"data.{name}_classes: {pool.name} has {len(set(classes))} class(es) "
                          f"({', '.join(pool.class_names)}); a task needs at least two")
    return classes


def _check_present(pool: LabelledPool, name: str, classes: list[int], y, split: str, domain_ids) -> None:
    present = set(np.unique(y).tolist())
    absent = [c for c in classes if c not in present]
    if absent:
        named = f" ('{pool.class_names[absent[0]]}')" if 0 <= absent[0] < len(pool.class_names) else ""
        where = pool.name if split == "train" else f"the {split} split of {pool.name}"
        known = f"classes are {min(present)}..{max(present)}" if present else "no examples at all"
        raise ConfigError(f"data.{name}_classes: class {absent[0]}{named} has no examples in {where}"
                          f"{' in those domains' if domain_ids else ''} ({known})")


def _make_task(pool: LabelledPool, name: str, classes: list[int], data_cfg, seed: int) -> TaskSplits:
    """Cut on positions, then take the rows: the same draws as cutting the inputs themselves, and
    images that live on disk are never read here."""
    domains = list(data_cfg[f"{name}_domains"])
    domain_ids = _domain_ids(pool, name, domains)
    _check_present(pool, name, classes, pool.y_train, "train", ())
    rng = np.random.default_rng(seed)
    draw = lambda: int(rng.integers(2**31 - 1))  # noqa: E731  one independent stream per cut

    x, y = _select(pool.y_train, classes, pool.domain_train, domain_ids)
    if pool.x_test is not None:
        x_test, y_test = _select(pool.y_test, classes, pool.domain_test, domain_ids)
        _check_present(pool, name, classes, pool.y_test[x_test] if len(x_test) else [], "test", domain_ids)
    else:
        x, x_test, y, y_test = _split(x, y, data_cfg.test_fraction, draw())
    if pool.x_val is not None:  # the dataset's own validation split, as given
        x_train, y_train = x, y
        x_val, y_val = _select(pool.y_val, classes, pool.domain_val, domain_ids)
        _check_present(pool, name, classes, pool.y_val[x_val] if len(x_val) else [], "validation", domain_ids)
    else:
        x_train, x_val, y_train, y_val = _split(x, y, data_cfg.val_fraction, draw())
    cap = data_cfg.get("test_size")
    if cap is not None and cap < len(y_test):
        # its own stream: the other cuts draw what they drew before the cap existed
        test_seed = int(np.random.default_rng((seed, 1)).integers(2**31 - 1))
        x_test, _, y_test, _ = _split(x_test, y_test, len(y_test) - cap, test_seed)

    budget = data_cfg[f"{name}_train_size"]
    if budget is not None:
        if budget > len(y_train):
            raise ConfigError(
                f"data.{name}_train_size={budget} exceeds the {len(y_train)} {name} training examples "
                f"of {pool.name} left after holding out val/test; lower it or set it to null (all)"
            )
        if budget < len(y_train):
            x_train, _, y_train, _ = _split(x_train, y_train, len(y_train) - budget, draw())

    test_inputs = pool.x_train if pool.x_test is None else pool.x_test
    val_inputs = pool.x_train if pool.x_val is None else pool.x_val
    ood = None
    if name == "target" and (data_cfg.ood_domains or data_cfg.ood_shift is not None):
        ood = as_tensors(*_ood_test(pool, classes, data_cfg, take(test_inputs, x_test), y_test, draw()))
    return TaskSplits(name, list(classes), as_tensors(take(pool.x_train, x_train), y_train),
                      as_tensors(take(val_inputs, x_val), y_val), as_tensors(take(test_inputs, x_test), y_test),
                      domains, ood_test=ood)


def as_tensors(x, y):
    """Images as a tensor (or left on disk, an ImageColumn); text stays an array of strings
    until it meets the tokenizer."""
    if isinstance(x, np.ndarray) and x.dtype != object:
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x, torch.from_numpy(y)


def _ood_test(pool: LabelledPool, classes: list[int], data_cfg, x_test, y_test, seed: int):
    """The target classes from `data.ood_domains` (held-out domains: neither the target's nor the
    source's), at most `data.ood_test_size` of them (seeded); or, with `data.ood_shift`, the
    target test split under that shift (a `_target_` function x, seed → x, labels unchanged)."""
    if data_cfg.ood_shift is not None:
        from hydra.utils import instantiate

        if pool.is_text:
            raise ConfigError("data.ood_shift: shifts transform image tensors; for text name held-out "
                              "domains in data.ood_domains instead")
        if isinstance(x_test, ImageColumn):  # the test images, decoded once (a test split, not the pool)
            x_test = x_test[np.arange(len(x_test))].numpy()
        return instantiate(data_cfg.ood_shift, _partial_=True)(np.ascontiguousarray(x_test), seed=seed), y_test
    ood_ids = _domain_ids(pool, "ood", list(data_cfg.ood_domains))
    used = set(data_cfg.target_domains) | set(data_cfg.source_domains)
    overlap = sorted(used & set(data_cfg.ood_domains))
    if overlap:
        raise ConfigError(f"data.ood_domains={list(data_cfg.ood_domains)}: {overlap} also train the source or the "
                          "target; an out-of-distribution test needs held-out domains")
    parts = [(pool.x_train, *_select(pool.y_train, classes, pool.domain_train, ood_ids))]
    for inputs, labels, domain in ((pool.x_val, pool.y_val, pool.domain_val), (pool.x_test, pool.y_test, pool.domain_test)):
        if inputs is not None:
            parts.append((inputs, *_select(labels, classes, domain, ood_ids)))
    x = concatenate([take(inputs, positions) for inputs, positions, _ in parts])
    y = np.concatenate([labels for _, _, labels in parts])
    if len(y) == 0:
        raise ConfigError(f"data.ood_domains={list(data_cfg.ood_domains)}: no examples of the target classes there")
    size = data_cfg.ood_test_size
    if size is not None and size < len(y):
        keep = np.sort(np.random.default_rng(seed).choice(len(y), size, replace=False))
        x, y = take(x, keep), y[keep]
    return x, y


def _make_token_task(pool: LabelledPool, name: str, data_cfg, seed: int) -> TaskSplits:
    """Token classification and language modeling: every tag (every token) is in play, so only
    examples are split (seeded, not stratified: an example holds many tags)."""
    listed = data_cfg[f"{name}_classes"]
    classes = list(range(len(pool.class_names))) if listed is None or pool.language_modeling else list(listed)
    if classes != list(range(len(pool.class_names))):
        raise ConfigError(f"data.{name}_classes: {pool.name} is token classification and uses all its "
                          f"{len(pool.class_names)} tags: set it to [0, ..., {len(pool.class_names) - 1}]")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool.y_train))
    # the dataset's own test / validation sentences as given; otherwise seeded cuts of the rest
    n_test = 0 if pool.x_test is not None else int(round(data_cfg.test_fraction * len(order)))
    n_val = 0 if pool.x_val is not None else int(round(data_cfg.val_fraction * (len(order) - n_test)))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    budget = data_cfg[f"{name}_train_size"]
    if budget is not None:
        if budget > len(train):
            raise ConfigError(f"data.{name}_train_size={budget} exceeds the {len(train)} training sentences of "
                              f"{pool.name} left after holding out val/test; lower it or set it to null (all)")
        train = train[:budget]  # already a random order
    cut = lambda idx, x=pool.x_train, y=pool.y_train: (x[idx], y[idx])  # noqa: E731
    given = lambda x, y: (x, y) if x is not None else None  # noqa: E731
    test_split = given(pool.x_test, pool.y_test) or cut(test)
    if data_cfg.get("test_size") is not None:
        test_split = (test_split[0][:data_cfg.test_size], test_split[1][:data_cfg.test_size])
    return TaskSplits(name, classes, cut(train), given(pool.x_val, pool.y_val) or cut(val), test_split,
                      token_level=pool.token_labels, label_names=list(pool.class_names),
                      language_modeling=pool.language_modeling)


def make_transfer_data(pool: LabelledPool, data_cfg, seed: int, with_source: bool = True,
                       source_pool: Optional[LabelledPool] = None) -> TransferData:
    """Cut `pool` into a source task (None when `with_source` is False) and a target task; with
    `source_pool` (data.source_dataset), the source task is cut from that pool instead."""
    split_seed = seed if data_cfg.split_seed is None else data_cfg.split_seed
    source_from = pool if source_pool is None else source_pool
    source = None
    if with_source:
        if source_from.language_modeling != pool.language_modeling:
            raise ConfigError(f"data.source_dataset: {source_from.name} and data.dataset {pool.name} must both be "
                              "language-modeling corpora (data/corpus.py) or neither")
        if source_from.token_labels:
            hint = "" if source_pool is None else " (data.source_dataset)"
            raise ConfigError(f"data={source_from.name}{hint} is a single token-classification task: it has no source "
                              "task; use source=pretrained or source=scratch, or data.source_dataset=<a classification "
                              "dataset>")
        inputs = lambda p: "text" if p.is_text else f"images of shape {p.input_shape}"  # noqa: E731
        if inputs(source_from) != inputs(pool):
            raise ConfigError(f"data.source_dataset: {source_from.name} holds {inputs(source_from)} but data.dataset "
                              f"{pool.name} holds {inputs(pool)}; one backbone must read both")
        source = _make_token_task(source_from, "source", data_cfg, seed=split_seed * 2) \
            if source_from.language_modeling else \
            _make_task(source_from, "source", _classes(source_from, "source", data_cfg), data_cfg, seed=split_seed * 2)
    if pool.token_labels or pool.language_modeling:
        target = _make_token_task(pool, "target", data_cfg, seed=split_seed * 2 + 1)
    else:
        target = _make_task(pool, "target", _classes(pool, "target", data_cfg), data_cfg, seed=split_seed * 2 + 1)
    return TransferData(source, target, pool.input_shape, pool.name, pool.is_text,
                        source_dataset=source_from.name if with_source else None,
                        fingerprint=pool.fingerprint, source_fingerprint=source_from.fingerprint if with_source else None)
