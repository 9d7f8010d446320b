"""Seeded data order with exact mid-epoch resume.

Exact resume rests on two rules: (1) the data order of epoch ``e`` is a permutation seeded by
``(seed, e)``; (2) every random augmentation of sample ``i`` in epoch ``e`` draws from a generator
seeded by ``(seed, e, i)``, so it does not depend on worker processes. A training checkpoint then
only needs the epoch and the position in it (``runtime.loop.TrainState``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from runtime.distributed import DistInfo


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for every random choice made for sample ``index`` in ``epoch``."""
    return np.random.default_rng([seed, epoch, index])


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` forever: a fresh permutation per epoch seeded by ``(seed, epoch)``,
    starting at ``(start_epoch, start_offset)``; with several ranks each takes every world-th item."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, start_epoch: int = 0, start_offset: int = 0,
                 info: DistInfo = DistInfo()):
        if size == 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.start_epoch, self.start_offset, self.info = start_epoch, start_offset, info

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = self.start_epoch, self.start_offset
        while True:
            mine = self.order(epoch)[self.info.rank::self.info.world_size]
            for index in mine[offset:]:
                yield epoch, int(index)
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # per epoch and rank
        return math.ceil(self.size / self.info.world_size)


class Augmented(Dataset):
    """``base[i]`` passed through ``transform(sample, rng)`` with the rng of :func:`sample_rng`.
    Indexed by ``(epoch, index)`` (training) or by a plain ``index`` (evaluation, epoch 0)."""

    def __init__(self, base: Dataset, transform: Callable[[Any, np.random.Generator], Any], seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.transform(self.base[index], sample_rng(self.seed, epoch, index))


def training_loader(dataset: Dataset, batch_size: int, seed: int, workers: int, start_epoch: int = 0,
                    start_offset: int = 0, info: DistInfo = DistInfo(), collate_fn=None) -> DataLoader:
    sampler = EpochSampler(len(dataset), seed, True, start_epoch, start_offset, info)
    # The loader gets a generator of its own: creating an iterator would otherwise draw from
    # torch's global RNG (which drives dropout) and a resumed run would diverge.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))



def loader_factory(dataset: Dataset, batch_size: int, config, info: DistInfo, collate_fn=None):
    """``make_loader(epoch, offset)`` for :meth:`Trainer.run`: :func:`training_loader` with the
    harness config's seed and worker count."""
    return lambda epoch, offset: training_loader(dataset, batch_size, config.seed, config.workers, epoch, offset,
                                                 info, collate_fn=collate_fn)
