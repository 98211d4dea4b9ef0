"""Training order and augmentation draws as functions of ``(seed, epoch, index)`` alone.

A resumed run must see the same images in the same order with the same crops as an
uninterrupted one. Lightning does not restore the global RNG on resume, and an albumentations
pipeline carries its own running RNG (per DataLoader worker, continuing across epochs with
persistent workers), so neither can be trusted to replay. :class:`SeededSampler` therefore
shuffles like :class:`~torch.utils.data.DistributedSampler` (permutation seeded by
``seed + epoch``, shards by rank) and hands every index out together with its own augmentation
seed, drawn from ``seed`` and ``epoch``; :class:`~datamodules.image_dataset.ImageDataset`
re-seeds its pipeline with it before transforming that sample. Worker count, worker
persistence, DDP rank, and whatever else drew from the global RNG no longer matter.
"""
from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
from torch.utils.data import DistributedSampler

__all__ = ["SeededSampler", "sample_seeds"]


def sample_seeds(seed: int, epoch: int, size: int) -> np.ndarray:
    """``uint64`` ``(size,)``: the augmentation seed of each dataset index in ``epoch``.

    Drawn from ``np.random.default_rng([seed, epoch])``, so the seeds of two epochs (or two
    run seeds) are independent streams, and index ``i``'s seed does not depend on the order.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([int(seed), int(epoch)]).integers(0, 2**63, size=size, dtype=np.uint64)


class SeededSampler(DistributedSampler):
    """A :class:`DistributedSampler` that yields ``(index, augmentation_seed)`` pairs.

    Being a ``DistributedSampler``, Lightning neither replaces it under DDP nor forgets to call
    :meth:`set_epoch` on it (it does that with ``trainer.current_epoch``, which a resumed run
    restores). With one process pass ``num_replicas=1, rank=0``.

    Args:
        dataset: the map-style dataset (only its length is used).
        num_replicas, rank: the DDP world size and this process's global rank.
        shuffle: permute every epoch (``torch.randperm`` seeded by ``seed + epoch``).
        seed: the run's data seed (>= 0).
        drop_last: drop the tail that does not divide evenly over ranks instead of padding.
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seeds = sample_seeds(self.seed, self.epoch, len(self.dataset))
        for index in super().__iter__():
            yield index, int(seeds[index])
