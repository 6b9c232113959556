"""Deterministic, resumable data order and per-sample randomness, so that a resumed run replays exactly.

- :class:`ResumableSampler`: epoch permutations from ``(seed, epoch)``, sharded over ranks like
  ``DistributedSampler`` (padded to equal length), and able to start mid-epoch at a given batch.
- :class:`SeededDataset`: wraps a dataset so that each item's augmentation randomness (``random``, numpy,
  torch global RNGs) is seeded from ``(seed, epoch, index)`` — independent of worker count, worker order
  or how many samples were drawn before, hence identical after a resume.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, size: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if size < 1:
            raise ValueError("sampler: the dataset is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = -(-size // world_size)
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields epoch ``epoch`` from batch ``start_batch`` on (per rank)."""
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        """Full batches per rank and epoch (the loader drops the last, partial one)."""
        return self.per_rank // self.batch_size

    def epoch_indices(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[: self.per_rank * self.world_size - self.size]  # pad so every rank has per_rank
        return order[self.rank::self.world_size]

    def __iter__(self):
        indices = self.epoch_indices(self.epoch)[self.start_batch * self.batch_size:]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return self.per_rank - self.start_batch * self.batch_size


class SeededDataset(Dataset):
    """Items are requested as ``(epoch, index)``; the global host RNGs (Python, NumPy, torch's CPU generator)
    are seeded from (seed, epoch, index) for the item's transforms and restored afterwards, so loading never
    disturbs the training loop's randomness. The CUDA generators are left alone (``torch.manual_seed`` would
    reseed them too, and a loader in the training process would then reset the GPU's dropout stream per item)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        item_seed = (self.seed * 1_000_003 + epoch * 10_007 + index) % 2**31
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(item_seed)
        np.random.seed(item_seed)
        torch.default_generator.manual_seed(item_seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
