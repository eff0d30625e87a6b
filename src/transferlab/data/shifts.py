"""Label-preserving shifts for an out-of-distribution test split (`data.ood_shift`): each takes
the target test images (float32, pixels in [0, 1]) and a seed and returns shifted images."""

from __future__ import annotations

import numpy as np

from transferlab.config import NonNegative, Probability


def gaussian_noise(x: np.ndarray, seed: int, sigma: NonNegative = 0.3) -> np.ndarray:
    """Additive N(0, sigma²) pixel noise, clipped to [0, 1] (ImageNet-C's gaussian_noise)."""
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0.0, sigma, x.shape), 0.0, 1.0).astype(np.float32)


def contrast(x: np.ndarray, seed: int, factor: Probability = 0.3) -> np.ndarray:
    """Contrast lowered toward each image's mean: x' = mean + factor · (x − mean)."""
    mean = x.mean(axis=tuple(range(1, x.ndim)), keepdims=True)
    return (mean + factor * (x - mean)).astype(np.float32)


def invert(x: np.ndarray, seed: int) -> np.ndarray:
    """Negative images, 1 − x: same shapes, reversed polarity."""
    return (1.0 - x).astype(np.float32)
