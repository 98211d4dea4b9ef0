"""Batches of whole training tuples (anchor, positive, G negatives) for CFCD stage 2, on one device or many.

CFCD's second stage trains local descriptors on tuples: an anchor, a positive (another image of the
anchor's class) and G hard negatives (images of the classes the stage-1 model confuses the anchor
with; mined by :mod:`sg_train.hard_negatives`). The published sampler needs more than one GPU;
:class:`TupleBatchSampler` runs on one device and under DDP alike.

Every epoch every *eligible* anchor (an image whose class has at least 2 images) is the anchor of
exactly one tuple, over all ranks together. Everything drawn is a function of ``(seed, epoch)``
(the order) or ``(seed, epoch, anchor)`` (the tuple's images), never of the rank, the number of
ranks, worker processes or any running RNG: a resumed run replays its epochs exactly, and every
rank computes the same global plan and keeps its own share. The tuples' augmentation seeds come
from :func:`datamodules.sampler.sample_seeds`, so :class:`~datamodules.image_dataset.ImageDataset`
consumes the batches as it consumes :class:`~datamodules.sampler.SeededSampler`'s pairs (an image
has one augmentation seed per epoch, wherever it appears).

Per-anchor draws use a counter-based hash (SplitMix64 over ``(seed, epoch, anchor, draw)``) rather
than one ``numpy`` generator per anchor: the same independence, vectorised over a batch (building
a generator per anchor costs tens of microseconds, minutes per epoch on GLDv2).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from sg_train.errors import OptionError, UserInputError

from .sampler import sample_seeds

__all__ = ["TupleBatchSampler"]

_ORDER_STREAM = 0x7475706C  # "tupl": the epoch's anchor order, a stream apart from sample_seeds' [seed, epoch]
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 of a ``uint64`` array (wrapping arithmetic), element-wise."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def _uniform(key: np.ndarray, stream: int) -> np.ndarray:
    """float64 in [0, 1): draw ``stream`` of each per-anchor key (``uint64``), 53 random bits."""
    return (_splitmix(key ^ np.uint64(stream)) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _below(u: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """int64 in [0, n): ``floor(u * n)`` (``u`` in [0, 1), ``n >= 1``)."""
    return np.minimum((u * n).astype(np.int64), np.asarray(n, dtype=np.int64) - 1)


class TupleBatchSampler(Sampler[list[tuple[int, int]]]):
    """A batch sampler of whole tuples ``[a, p, n_1..n_G]``, as ``(index, augmentation_seed)`` pairs.

    Each batch is a flat list ``[a, p, n_1, ..., n_G, a', p', ...]`` of ``(dataset index,
    augmentation seed)`` pairs, ``2 + G`` per tuple, in tuple order (``DataLoader(dataset,
    batch_sampler=sampler)``; regroup the collated batch with ``view(-1, tuple_size, ...)``).

    An epoch's tuples:

    - **anchors**: every image of a class with >= 2 images, once, in an order permuted by
      ``(seed, epoch)``. Images of a class with a single image are never anchors; such classes are
      counted in :attr:`single_image_classes` (they can still give negatives).
    - **positive**: another image of the anchor's class, uniform, drawn from ``(seed, epoch, anchor)``.
    - **negatives**: one image (uniform within the class, drawn from ``(seed, epoch, anchor)``) of
      each of the anchor's first G *usable* hard-negative classes in their order; a class is usable
      if it is not the anchor's own, has training images and was not named earlier in the row.
      When fewer than G are usable (or ``hard_negative_classes`` is None), the rest are images of
      random other classes (uniform over the classes not yet in the tuple). The G negatives are
      of G distinct classes, none the anchor's.

    Under DDP the T tuples, in the epoch's order, are cut into ``W * nb`` consecutive batches,
    ``nb = ceil(T / (W * t))``, of ``floor`` or ``ceil`` of ``T / (W * nb)`` tuples (never more
    than ``t``; sizes differ by at most one tuple); global batch ``b`` goes to rank ``b % W``. So
    every rank has ``nb`` batches (DDP needs equal step counts) and every anchor is in exactly one
    rank's batch. A batch can be empty only with ``tuples_per_batch == 1`` when ``W`` does not divide
    ``T`` (yielded as ``[]``; :class:`~datamodules.collate.SkipFailedCollate` makes it a ``B = 0``
    batch).

    Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` (not on the batch sampler),
    hence :attr:`sampler` is this object. It cannot inject a ``DistributedSampler`` into a custom
    batch sampler: under DDP train with ``Trainer(use_distributed_sampler=False)`` and pass the
    trainer's ``world_size`` and ``global_rank`` here.

    Args:
        labels: int ``(N,)``: the class of every training image (any ids >= 0).
        hard_negative_classes: int ``(N, top_n)``: each image's most confusable other classes, most
            confusable first, in the ids of ``labels`` (-1, unknown ids and the image's own class are
            skipped); e.g. :attr:`sg_train.hard_negatives.HardNegatives.wrong_classes`. None: random
            negatives only.
        tuples_per_batch: t, tuples per batch on each rank (>= 1).
        negatives_per_tuple: G (>= 1).
        seed: the run's data seed (>= 0).
        num_replicas, rank: DDP world size W and this process's global rank.

    Raises :class:`~sg_train.errors.OptionError` for out-of-range arguments and
    :class:`~sg_train.errors.UserInputError` when the data cannot make tuples: fewer eligible
    anchors than ranks, fewer than G + 1 classes, or hard negatives of another shape.
    """

    def __init__(
        self,
        labels: np.ndarray,
        hard_negative_classes: np.ndarray | None = None,
        *,
        tuples_per_batch: int,
        negatives_per_tuple: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        for name, value, low in (("tuples_per_batch", tuples_per_batch, 1),
                                 ("negatives_per_tuple", negatives_per_tuple, 1),
                                 ("num_replicas", num_replicas, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or int(value) != value or int(value) < low:
                raise OptionError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(rank, bool) or int(rank) != rank or not 0 <= int(rank) < int(num_replicas):
            raise OptionError(f"rank must be an integer in [0, {num_replicas}), got {rank!r}")
        self.tuples_per_batch, self.negatives_per_tuple = int(tuples_per_batch), int(negatives_per_tuple)
        self.seed, self.num_replicas, self.rank = int(seed), int(num_replicas), int(rank)
        self.epoch = 0

        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
            raise UserInputError(f"labels must be a 1-D array of class ids >= 0, got {labels.dtype} {labels.shape}")
        self.num_images = len(labels)
        self.classes, self._class_of = np.unique(labels.astype(np.int64), return_inverse=True)  # compact ids 0..C-1
        sizes = np.bincount(self._class_of, minlength=len(self.classes))
        self._members = np.argsort(self._class_of, kind="stable")  # images grouped by class, ascending within
        self._starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._sizes = sizes.astype(np.int64)
        self._place = np.empty(self.num_images, np.int64)  # each image's position within its class
        self._place[self._members] = np.arange(self.num_images) - self._starts[self._class_of[self._members]]

        #: Classes with a single image: they give no anchor (no positive exists).
        self.single_image_classes = int((sizes == 1).sum())
        self.anchors = np.flatnonzero(sizes[self._class_of] >= 2)  # eligible anchors, ascending
        G = self.negatives_per_tuple
        if len(self.classes) < G + 1:
            raise UserInputError(f"negatives_per_tuple={G} needs at least {G + 1} classes (each negative of its own "
                                 f"class, none the anchor's); the training data has {len(self.classes)}: lower it")
        if len(self.anchors) < self.num_replicas:
            raise UserInputError(
                f"{len(self.anchors)} eligible anchors (images of a class with >= 2 images; "
                f"{self.single_image_classes} single-image classes give none) are too few for {self.num_replicas} "
                "processes: every process needs at least one tuple per batch; use fewer processes or more images "
                "per class")
        self._hard = self._usable_hard_classes(hard_negative_classes)

    # ------------------------------------------------------------------ set-up
    def _usable_hard_classes(self, hard: np.ndarray | None) -> np.ndarray:
        """int64 ``(T, G)``: each anchor's first G usable hard-negative classes (compact ids), -1 to top up."""
        T, G = len(self.anchors), self.negatives_per_tuple
        out = np.full((T, G), -1, np.int64)
        if hard is None:
            return out
        hard = np.asarray(hard)
        if hard.ndim != 2 or hard.shape[0] != self.num_images or not np.issubdtype(hard.dtype, np.integer):
            raise UserInputError(f"hard_negative_classes must be integers of shape ({self.num_images}, top_n), one row "
                                 f"per training image; got {hard.dtype} {hard.shape} (mined on another data set?)")
        block = 1 << 16  # anchors at a time: bounded memory on millions of images
        for lo in range(0, T, block):
            anchors = self.anchors[lo:lo + block]
            wanted = hard[anchors].astype(np.int64)
            compact = np.searchsorted(self.classes, wanted).clip(max=len(self.classes) - 1)
            usable = (wanted >= 0) & (self.classes[compact] == wanted) & (compact != self._class_of[anchors, None])
            for j in range(1, wanted.shape[1]):  # a class named twice counts once
                usable[:, j] &= ~((compact[:, :j] == compact[:, j:j + 1]) & usable[:, :j]).any(axis=1)
            order = np.argsort(~usable, axis=1, kind="stable")[:, :G]  # usable columns first, in their order
            taken = np.take_along_axis(np.where(usable, compact, -1), order, axis=1)
            out[lo:lo + len(anchors), :taken.shape[1]] = taken
        return out

    # ------------------------------------------------------------------ the plan
    @property
    def sampler(self) -> TupleBatchSampler:
        """This object: Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``."""
        return self

    @property
    def num_tuples(self) -> int:
        """T: tuples per epoch over all ranks (the eligible anchors)."""
        return len(self.anchors)

    @property
    def tuple_size(self) -> int:
        """Images per tuple: ``2 + G``."""
        return 2 + self.negatives_per_tuple

    @property
    def hard_negative_fraction(self) -> float:
        """Share of the epoch's negatives taken from the hard-negative classes (the rest are random)."""
        return float((self._hard >= 0).mean()) if self._hard.size else 0.0

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or int(epoch) != epoch or int(epoch) < 0:
            raise OptionError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """nb: batches per rank and epoch, the same on every rank."""
        return int(-(-self.num_tuples // (self.num_replicas * self.tuples_per_batch)))

    def batch_bounds(self) -> np.ndarray:
        """int64 ``(nb, 2)``: this rank's batches as ``[start, stop)`` into the epoch's tuple order."""
        nb, W = len(self), self.num_replicas
        base, extra = divmod(self.num_tuples, W * nb)
        sizes = base + (np.arange(W * nb) < extra)
        stops = np.cumsum(sizes)
        bounds = np.stack([stops - sizes, stops], axis=1)
        return bounds[self.rank::W]

    def tuples(self, anchors: np.ndarray, epoch: int | None = None) -> np.ndarray:
        """int64 ``(len(anchors), 2 + G)``: the tuples ``[a, p, n_1..n_G]`` of eligible ``anchors``
        (dataset indices) in ``epoch`` (default: the current one). A function of
        ``(seed, epoch, anchor)`` alone."""
        epoch = self.epoch if epoch is None else int(epoch)
        anchors = np.asarray(anchors, dtype=np.int64)
        slot = np.searchsorted(self.anchors, anchors)
        if len(anchors) and (slot.max() >= len(self.anchors) or (self.anchors[slot] != anchors).any()):
            raise ValueError("tuples() takes eligible anchors only (images of a class with >= 2 images)")
        G, C = self.negatives_per_tuple, len(self.classes)
        key = _splitmix(_splitmix(_splitmix(np.full(len(anchors), self.seed, np.uint64)) ^ np.uint64(epoch))
                        ^ anchors.astype(np.uint64))
        own = self._class_of[anchors]
        out = np.empty((len(anchors), 2 + G), np.int64)
        out[:, 0] = anchors
        k = _below(_uniform(key, 0), self._sizes[own] - 1)  # one of the n - 1 other images
        out[:, 1] = self._members[self._starts[own] + k + (k >= self._place[anchors])]
        negative = self._hard[slot].copy()
        excluded = np.concatenate([own[:, None], negative], axis=1)  # the tuple's classes so far (-1: none yet)
        for j in range(G):
            need = negative[:, j] < 0
            if need.any():  # uniform over the classes not in the tuple: skip the excluded ids in ascending order
                skip = np.sort(np.where(excluded[need] >= 0, excluded[need], C), axis=1)
                pick = _below(_uniform(key[need], 1 + G + j), C - (skip < C).sum(axis=1))
                for column in range(skip.shape[1]):
                    pick += pick >= skip[:, column]
                negative[need, j] = pick
                excluded[need, 1 + j] = pick
            cls = negative[:, j]
            out[:, 2 + j] = self._members[self._starts[cls] + _below(_uniform(key, 1 + j), self._sizes[cls])]
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.anchors[np.random.default_rng([self.seed, self.epoch, _ORDER_STREAM]).permutation(self.num_tuples)]
        seeds = sample_seeds(self.seed, self.epoch, self.num_images)
        for start, stop in self.batch_bounds():
            flat = self.tuples(order[start:stop]).reshape(-1)
            yield [(int(i), int(s)) for i, s in zip(flat, seeds[flat])]
