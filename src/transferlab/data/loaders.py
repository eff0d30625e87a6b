"""Batches straight from in-memory tensors.

A DataLoader over a TensorDataset collates one example at a time (~40% of a small CNN's step on
CPU); indexing a whole batch at once is the same data in the same seeded order, without that cost.
"""

from __future__ import annotations

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler


class TensorBatches(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index):  # index: a list of positions (one whole batch)
        return self.x[index], self.y[index]


def make_loader(split: tuple[torch.Tensor, torch.Tensor], batch_size: int, *, shuffle: bool, seed: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """`pin_memory`: each batch is copied into page-locked memory, so its copy to a GPU
    (`TaskModule.transfer_batch_to_device`, non_blocking) runs asynchronously. CPU runs: leave off."""
    dataset = TensorBatches(*split)
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    batches = BatchSampler(sampler, batch_size=batch_size, drop_last=False)
    return DataLoader(dataset, sampler=batches, batch_size=None, pin_memory=pin_memory)
