"""What every dataset loader returns: inputs and labels in the dataset's own train (and, when it
has them, validation / test) splits. Inputs are numpy arrays (the bundled datasets) or, for
images read through Hugging Face `datasets` (data/hf.py), an `ImageColumn` that decodes per batch;
the split logic only ever takes rows of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np


@dataclass
class LabelledPool:
    x_train: Any  # float32 (N, *input_shape), an object array of N texts (strings or word tuples), or an ImageColumn
    y_train: np.ndarray  # int64 original class ids (token_labels: an object array of tag-id arrays)
    x_test: Optional[np.ndarray]  # None: the dataset has no official test split
    y_test: Optional[np.ndarray]
    class_names: list[str]
    name: str
    # Optional domain of each example (an index into domain_names): lets a task be cut by
    # domain (data.source_domains / target_domains) instead of by class.
    domain_train: Optional[np.ndarray] = None
    domain_test: Optional[np.ndarray] = None
    domain_names: Optional[list[str]] = None
    # Token classification (NER): x holds word tuples, y an int64 tag array per example
    # (class_names are the tag names); tasks are cut by example, never by class.
    token_labels: bool = False
    # Language modeling (data/corpus.py): x holds texts, y is all 0 (unused); tasks are cut by
    # example, and the labels are the texts' own next tokens.
    language_modeling: bool = False
    # The dataset's own validation split (used as given, never cut from training data); None: cut
    # from the training split (data.val_fraction).
    x_val: Any = None
    y_val: Optional[np.ndarray] = None
    domain_val: Optional[np.ndarray] = None
    # What the data is, for cache keys (a hash of the dataset's fingerprint and its files' paths,
    # sizes and modification times); None: the loader's config names it (bundled datasets).
    fingerprint: Optional[str] = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def is_text(self) -> bool:
        return self.x_train.dtype == object
