"""What makes a training run's data exactly resumable (:func:`dynamask.engine.train.train`).

A run resumed mid-epoch must see the batches and random draws that one that never stopped would. The order of
the samples is a function of (seed, epoch) (:class:`ResumableSampler`, or LVIS's
:class:`~dynamask.data.lvis.RepeatFactorSampler`), and each sample's augmentation a function of
(seed, epoch, index) (:class:`SeededSamples`): neither depends on the global random state, on the data-loading
processes or on how many batches came before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from torch.utils.data import Dataset, DistributedSampler


class SeededSamples(Dataset):
    """Runs the wrapped dataset's random transforms under a seed made of (seed, epoch, index).

    Why: the transforms draw from torch's global generator, which in a data-loading process depends on what
    that process loaded before; seeding each sample makes its flip (say) the same whichever process loads
    it and whether or not the run was resumed. The trainer sets :attr:`epoch` at the start of each epoch.
    """

    def __init__(self, dataset: Dataset, *, seed: int) -> None:
        self.dataset, self.seed, self.epoch = cast("Sequence[Any]", dataset), seed, 0  # a map-style one

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        # index may be a sample id i + k * len (the k-th copy of item i in an epoch, see RepeatFactorSampler),
        # so that each copy gets its own random transform
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % (2**63))
            return self.dataset[index % len(self.dataset)]


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch) that can start part-way through an epoch.

    Why: a run resumed mid-epoch continues the epoch's shuffle where it stopped, rather than reshuffling or
    starting the epoch over. The trainer calls ``set_epoch`` and sets :attr:`start` (the samples of this
    process's share already trained on) before each epoch.
    """

    start = 0  # samples of this process's share to skip

    def __iter__(self) -> Iterator[Any]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start
