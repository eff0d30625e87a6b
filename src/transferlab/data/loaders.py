"""Batches by whole-batch indexing: of in-memory tensors, or of images on disk (data/hf.py's
`ImageColumn` decodes a batch when indexed — in a DataLoader worker when `num_workers` > 0).

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
LM_EVAL_BATCH = 16  # a language model's logits are (batch × length × vocabulary): 16 × 64 × 49k ≈ 200 MB


def eval_batch(splits) -> int:
    """The batch of passes without gradients over a task's splits (data.splits.TaskSplits)."""
    return LM_EVAL_BATCH if getattr(splits, "language_modeling", False) else EVAL_BATCH


class TensorBatches(Dataset):
    """`with_index`: batches are (x, y, positions) — what a method's precomputed per-example
    statistics (LwF's teacher logits) are indexed by; else (x, y). `augment`: images get a random
    resized crop and flip, drawn from (seed, the batch's positions), so a batch's augmentation is
    the same whichever worker makes it and after a resume."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, with_index: bool = False, augment: bool = False,
                 seed: int = 0):
        self.x, self.y, self.with_index, self.augment, self.seed = x, y, with_index, augment, seed

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index):  # index: a list of positions (one whole batch)
        x = self.x[index]
        if self.augment:
            x = random_resized_crop_and_flip(x, np.random.default_rng([self.seed, *index]))
        if self.with_index:
            return x, self.y[index], torch.as_tensor(index, dtype=torch.long)
        return x, self.y[index]


CROP_SCALE, CROP_RATIO = (0.25, 1.0), (3 / 4, 4 / 3)  # of the image's area; aspect ratio (Inception's)


def random_resized_crop_and_flip(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Per image: a crop of CROP_SCALE of its area at an aspect ratio in CROP_RATIO, resized back
    to the image's size (bilinear), then a horizontal flip with probability ½."""
    n, _, h, w = images.shape
    out = torch.empty_like(images)
    for i in range(n):
        area = h * w * rng.uniform(*CROP_SCALE)
        ratio = np.exp(rng.uniform(*np.log(CROP_RATIO)))
        ch, cw = min(h, max(1, round((area / ratio) ** 0.5))), min(w, max(1, round((area * ratio) ** 0.5)))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = images[i:i + 1, :, top:top + ch, left:left + cw]
        crop = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        out[i] = crop[0].flip(-1) if rng.random() < 0.5 else crop[0]
    return out


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
                rank: int = 0, world_size: int = 1, pin_memory: bool = False, with_index: bool = False,
                num_workers: int = 0, augment: bool = False) -> DataLoader:
    if not getattr(split[0], "decodes", False):
        num_workers = 0  # in-memory tensors and tokens: a worker would only copy them
    dataset = TensorBatches(*split, with_index=with_index, augment=augment, seed=seed)
    batches = EpochBatches(len(dataset), batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    # Its own generator: creating an iterator draws a base seed from it, which would otherwise
    # come from the global RNG and shift dropout's random numbers by a draw per epoch and per
    # validation pass (a resumed run creates its iterators at different moments).
    return DataLoader(dataset, sampler=batches, batch_size=None, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed), num_workers=num_workers,
                      persistent_workers=num_workers > 0)
