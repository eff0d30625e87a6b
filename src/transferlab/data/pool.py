"""What every dataset loader returns: arrays in their official train/test pools."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class LabelledPool:
    x_train: np.ndarray  # float32 (N, *input_shape), or an object array of N texts (strings or word tuples)
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

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def is_text(self) -> bool:
        return self.x_train.dtype == object
