"""Text: tokenized once per run, padded per batch.

`tokenize_transfer_data` runs the backbone's tokenizer once over every split (not once per epoch)
and keeps the ids padded to the split's longest text. A loader batch is then whole-batch indexing
as for images, cut to the longest text *in that batch* (dynamic padding), so a batch of short
tweets does not pay for the longest one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from transferlab.data.splits import TaskSplits, TransferData
from transferlab.errors import ConfigError


class Tokens:
    """Token ids and attention mask of N texts; indexing a batch gives the dict an encoder reads."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.input_ids, self.attention_mask = input_ids, attention_mask

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        ids, mask = self.input_ids[index], self.attention_mask[index]
        used = mask.any(0)  # drop the columns that are padding in every text of this batch
        return {"input_ids": ids[:, used], "attention_mask": mask[:, used]}


def tokenize(texts, tokenizer, max_length: int) -> Tokens:
    """An array of strings, or data=hf's TextColumn (tokenized through datasets.map, cached on disk
    with the dataset), padded as the tokenizer pads to the longest text."""
    if hasattr(texts, "tokenized"):
        encoded = tokenizer.pad({"input_ids": texts.tokenized(tokenizer, max_length)}, padding="longest",
                                return_tensors="pt")
    else:
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest",
                            return_token_type_ids=False, return_tensors="pt")
    return Tokens(encoded["input_ids"], encoded["attention_mask"])


IGNORE = -100  # label of sub-tokens that are not scored: F.cross_entropy's default ignore_index


class TokenLabels:
    """Per-sub-token labels of N texts, cut per batch to the same columns as their `Tokens`."""

    def __init__(self, labels: torch.Tensor, attention_mask: torch.Tensor):
        self.labels, self.attention_mask = labels, attention_mask

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> torch.Tensor:
        return self.labels[index][:, self.attention_mask[index].any(0)]


def align_labels(word_ids: list, word_labels) -> list[int]:
    """The first sub-token of each word carries the word's label; later sub-tokens of the same
    word and special tokens get IGNORE, so each word is scored once."""
    aligned, previous = [], None
    for word in word_ids:
        aligned.append(IGNORE if word is None or word == previous else int(word_labels[word]))
        previous = word
    return aligned


def tokenize_words(sentences: np.ndarray, labels, tokenizer, max_length: int) -> tuple[Tokens, TokenLabels]:
    """Pre-split words (NER): sub-token ids plus word labels aligned to them. Words cut off by
    `max_length` are not scored (their labels are lost with them)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{type(tokenizer).__name__}: token classification needs a fast tokenizer (word_ids)")
    encoded = tokenizer([list(s) for s in sentences], is_split_into_words=True, truncation=True,
                        max_length=max_length, padding="longest", return_token_type_ids=False, return_tensors="pt")
    aligned = torch.tensor([align_labels(encoded.word_ids(i), labels[i]) for i in range(len(sentences))],
                           dtype=torch.long).reshape(encoded["input_ids"].shape)
    mask = encoded["attention_mask"]
    return Tokens(encoded["input_ids"], mask), TokenLabels(aligned, mask)


def next_token_labels(tokens: Tokens) -> tuple[Tokens, TokenLabels]:
    """A text's labels are its own tokens (the task shifts them: position t predicts t+1);
    padding is not scored."""
    labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, IGNORE)
    return tokens, TokenLabels(labels, tokens.attention_mask)


def tokenize_chat(pairs, tokenizer, max_length: int) -> tuple[Tokens, TokenLabels]:
    """(prompt, answer) pairs as the model's chat: the user turn and the assistant turn through the
    tokenizer's chat template; only the assistant's tokens (its answer and end-of-turn) are
    scored. A pair whose prompt alone fills `max_length` is refused rather than silently unscored."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"data: instruction data needs a chat template, and {type(tokenizer).__name__} "
                          f"({tokenizer.name_or_path}) has none: use a chat model (backbone=smollm2) or plain text")
    ids, labels = [], []
    for prompt, answer in pairs:
        user = [{"role": "user", "content": prompt}]
        start = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
        whole = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=True,
                                              return_dict=False)
        if whole[:len(start)] != start:
            raise ConfigError(f"data: {tokenizer.name_or_path}'s chat template does not extend the prompt when an "
                              "answer follows; it cannot mark which tokens to score")
        if len(start) >= max_length:
            raise ConfigError(f"data.max_length={max_length}: a prompt of {len(start)} tokens leaves no room for its "
                              "answer; raise data.max_length or shorten the instruction")
        whole = whole[:max_length]
        ids.append(whole)
        labels.append([IGNORE] * len(start) + whole[len(start):])
    width = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids], dtype=torch.long)
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], dtype=torch.long)
    scored = torch.tensor([lab + [IGNORE] * (width - len(lab)) for lab in labels], dtype=torch.long)
    return Tokens(input_ids, mask), TokenLabels(scored, mask)


def tokenize_transfer_data(data: TransferData, tokenizer, max_length: int) -> TransferData:
    def task(t: TaskSplits | None):
        if t is None:
            return None
        if t.token_level:
            splits = {s: tokenize_words(*getattr(t, s), tokenizer, max_length) for s in t.evaluation_splits}
            return dataclasses.replace(t, **splits)
        if t.language_modeling:
            chat = len(t.train[0]) and isinstance(t.train[0][0], tuple)
            splits = {s: tokenize_chat(getattr(t, s)[0], tokenizer, max_length) if chat else
                      next_token_labels(tokenize(getattr(t, s)[0], tokenizer, max_length)) for s in t.evaluation_splits}
            return dataclasses.replace(t, **splits)
        splits = {s: (tokenize(getattr(t, s)[0], tokenizer, max_length), getattr(t, s)[1])
                  for s in t.evaluation_splits}
        return dataclasses.replace(t, **splits)

    return dataclasses.replace(data, source=task(data.source), target=task(data.target))
