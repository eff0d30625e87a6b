"""Batches straight from in-memory tensors.

A DataLoader over a TensorDataset collates one example at a time (~40% of a small CNN's step on
CPU); indexing a whole batch at once is the same data without that cost.

`EpochBatches` makes each epoch's order a pure function of (seed, epoch), which is what exact
resume and DDP need: a resumed run skips the batches its checkpoint already trained
(`resume_at`), and every DDP rank draws the same global batches and keeps its own slice.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

EVAL_BATCH = 256  # batches for passes without gradients (validation, test, the Fisher)


class TensorBatches(Dataset):
    """`with_index`: batches are (x, y, positions) — what a method's precomputed per-example
    statistics (LwF's teacher logits) are indexed by; else (x, y)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, with_index: bool = False):
        self.x, self.y, self.with_index = x, y, with_index

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index):  # index: a list of positions (one whole batch)
        if self.with_index:
            return self.x[index], self.y[index], torch.as_tensor(index, dtype=torch.long)
        return self.x[index], self.y[index]


class EpochBatches(Sampler):
    """Yields lists of positions, one per batch: shuffled per epoch (seeded) or in order.

    Under DDP each of `world_size` ranks gets its contiguous slice of every global batch of
    `batch_size`, so the optimizer steps on the same global batches as one process would.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained in it)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """The next iteration is epoch `epoch` without its first `batches_done` batches."""
        self.epoch, self._resume = epoch, (epoch, batches_done)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        batches, rest = divmod(self.n, self.batch_size)
        # DDP: a last global batch too small to give every rank an example is dropped.
        return batches + (rest >= self.world_size if self.world_size > 1 else rest > 0)

    def __iter__(self):
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
        self._resume = None
        positions = self.order(self.epoch).tolist()
        for start in range(skip * self.batch_size, self.n, self.batch_size):
            batch = positions[start:start + self.batch_size]
            if self.world_size > 1:
                if len(batch) < self.world_size:
                    return
                size = len(batch)  # shares differ by at most one example
                batch = batch[self.rank * size // self.world_size:(self.rank + 1) * size // self.world_size]
            yield batch


def make_loader(split: tuple[torch.Tensor, torch.Tensor], batch_size: int, *, shuffle: bool, seed: int = 0,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False, with_index: bool = False) -> DataLoader:
    dataset = TensorBatches(*split, with_index=with_index)
    batches = EpochBatches(len(dataset), batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    # Its own generator: creating an iterator draws a base seed from it, which would otherwise
    # come from the global RNG and shift dropout's random numbers by a draw per epoch and per
    # validation pass (a resumed run creates its iterators at different moments).
    return DataLoader(dataset, sampler=batches, batch_size=None, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed))
