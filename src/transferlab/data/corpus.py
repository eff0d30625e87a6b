"""Text as a language-modeling corpus: any text pool's texts (its labels dropped), for next-token
prediction. `data=tweets_lm` continues a language model on tweets and measures what it forgot on
BBC news articles; `data=hf` text datasets work the same way (nest them as `pool`).

With `instruction`, the corpus is instruction data instead: each text becomes a chat turn
(user: the instruction and the text; assistant: the text's class name), laid out by the model's
own chat template, and only the assistant's tokens are scored (`data=tweets_instruct`)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from transferlab.data.pool import LabelledPool
from transferlab.errors import ConfigError


def language_modeling_corpus(pool: LabelledPool, domains: Optional[Sequence[str]] = None,
                             name: Optional[str] = None, instruction: Optional[str] = None) -> LabelledPool:
    """`pool`'s texts (of `domains` only, when given) as one corpus; its own val / test texts,
    when it has them, stay its val / test splits. `instruction`: (prompt, answer) pairs instead,
    the prompt `instruction` + the text, the answer the text's class name."""
    if not pool.is_text or pool.token_labels:
        raise ConfigError(f"data.dataset: {pool.name} is not a pool of whole texts; language modeling reads a text column")
    keep_train = _in_domains(pool, pool.domain_train, domains)
    def texts(x, keep, y=None):
        if x is None:
            return None
        x = np.asarray(x, dtype=object)[keep]
        if instruction is None:
            return x
        pairs = np.empty(len(x), dtype=object)
        pairs[:] = [(f"{instruction}\n\n{t}", pool.class_names[c]) for t, c in zip(x, np.asarray(y)[keep])]
        return pairs

    label = lambda x: None if x is None else np.zeros(len(x), dtype=np.int64)  # noqa: E731
    x_test = texts(pool.x_test, _in_domains(pool, pool.domain_test, domains), pool.y_test) \
        if pool.x_test is not None else None
    x_val = texts(pool.x_val, _in_domains(pool, pool.domain_val, domains), pool.y_val) if pool.x_val is not None else None
    x_train = texts(pool.x_train, keep_train, pool.y_train)
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
