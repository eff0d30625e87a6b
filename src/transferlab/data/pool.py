"""What every dataset loader returns: arrays in their official train/test pools."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class LabelledPool:
    x_train: np.ndarray  # float32, (N, *input_shape)
    y_train: np.ndarray  # int64 original class ids
    x_test: Optional[np.ndarray]  # None: the dataset has no official test split
    y_test: Optional[np.ndarray]
    class_names: list[str]
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])
