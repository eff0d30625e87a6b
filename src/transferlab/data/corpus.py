"""Text as a language-modeling corpus: any text pool's texts (its labels dropped), for next-token
prediction. `data=tweets_lm` continues a language model on tweets and measures what it forgot on
BBC news articles; `data=hf` text datasets work the same way (nest them as `pool`)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from transferlab.data.pool import LabelledPool
from transferlab.errors import ConfigError


def language_modeling_corpus(pool: LabelledPool, domains: Optional[Sequence[str]] = None,
                             name: Optional[str] = None) -> LabelledPool:
    """`pool`'s texts (of `domains` only, when given) as one corpus; its own val / test texts,
    when it has them, stay its val / test splits."""
    if not pool.is_text or pool.token_labels:
        raise ConfigError(f"data.dataset: {pool.name} is not a pool of whole texts; language modeling reads a text column")
    keep_train = _in_domains(pool, pool.domain_train, domains)
    texts = lambda x, keep: None if x is None else np.asarray(x, dtype=object)[keep]  # noqa: E731
    label = lambda x: None if x is None else np.zeros(len(x), dtype=np.int64)  # noqa: E731
    x_test = texts(pool.x_test, _in_domains(pool, pool.domain_test, domains)) if pool.x_test is not None else None
    x_val = texts(pool.x_val, _in_domains(pool, pool.domain_val, domains)) if pool.x_val is not None else None
    x_train = texts(pool.x_train, keep_train)
    suffix = f"[{','.join(domains)}]" if domains else ""
    return LabelledPool(x_train, label(x_train), x_test, label(x_test), ["text"], name=name or f"{pool.name}{suffix}",
                        x_val=x_val, y_val=label(x_val), fingerprint=pool.fingerprint, language_modeling=True)


def _in_domains(pool: LabelledPool, domain: Optional[np.ndarray], domains) -> np.ndarray | slice:
    if not domains:
        return slice(None)
    if not pool.domain_names or domain is None:
        raise ConfigError(f"data.dataset.domains: {pool.name} has no domains; leave it null (every text)")
    unknown = [d for d in domains if d not in pool.domain_names]
    if unknown:
        raise ConfigError(f"data.dataset.domains: '{unknown[0]}' is not a domain of {pool.name} "
                          f"(domains: {', '.join(pool.domain_names)})")
    return np.isin(domain, [pool.domain_names.index(d) for d in domains])
