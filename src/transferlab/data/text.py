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


def tokenize(texts: np.ndarray, tokenizer, max_length: int) -> Tokens:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest",
                        return_token_type_ids=False, return_tensors="pt")
    return Tokens(encoded["input_ids"], encoded["attention_mask"])


def tokenize_transfer_data(data: TransferData, tokenizer, max_length: int) -> TransferData:
    def task(t: TaskSplits | None):
        if t is None:
            return None
        splits = {s: (tokenize(getattr(t, s)[0], tokenizer, max_length), getattr(t, s)[1])
                  for s in ("train", "val", "test")}
        return dataclasses.replace(t, **splits)

    return dataclasses.replace(data, source=task(data.source), target=task(data.target))
