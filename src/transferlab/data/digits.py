"""scikit-learn's bundled 8×8 digits (1,797 images, 10 classes): no download, loads in ms."""

from __future__ import annotations

import numpy as np

from transferlab.data.pool import LabelledPool


def load_digits() -> LabelledPool:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    # Pixel values are 0..16; scale to [0, 1] and keep a channel axis for the CNN.
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    return LabelledPool(x, y, None, None, [str(c) for c in range(10)], name="digits")
