"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (IDX files, gzip)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from transferlab.data.pool import LabelledPool
from transferlab.errors import TransferlabError

CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle-boot"]  # fmt: skip
FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


def _read_idx(path: Path, header: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise TransferlabError(f"{path}: cannot be read as a gzip IDX file ({e}); reinstall it") from e
    return np.frombuffer(raw, dtype=np.uint8, offset=header)


def load_fashion_mnist(path: str) -> LabelledPool:
    root = Path(path)
    missing = [name for name in FILES.values() if not (root / name).is_file()]
    if missing:
        raise TransferlabError(
            f"Fashion-MNIST not found: {root / missing[0]} is missing. Install it with "
            "`apt-get install dataset-fashion-mnist`, or set paths.fashion_mnist=<folder with the IDX .gz files>"
        )
    arrays = {}
    for key, name in FILES.items():
        is_images = key.startswith("x")
        data = _read_idx(root / name, header=16 if is_images else 8)
        arrays[key] = data.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0 if is_images else data.astype(np.int64)
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise TransferlabError(f"{root}: {split} images and labels differ in count; reinstall the dataset")
    return LabelledPool(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                        CLASS_NAMES, name="fashion_mnist")
