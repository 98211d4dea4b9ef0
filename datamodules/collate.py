"""Collate that drops samples whose image failed to load and lists them.

Input: samples from :class:`~datamodules.image_dataset.ImageDataset`. Output::

    {"image": float tensor (B, 3, H, W), "label": long (B,), "index": long (B,),
     "failed": ["<path>\t<reason>", ...]}   # samples skipped in this batch

Each ``failed`` entry is one string, path and reason joined by a tab (tabs/newlines inside
either are replaced by spaces), so it gathers across ranks and lands in a TSV report as is;
:func:`split_failed` turns it back into ``(path, reason)``.

If every sample failed, ``B == 0``: ``image`` has shape ``(0, *image_shape)`` (or
``(0, 3, 0, 0)`` when no shape was given) and the batch is still returned, never raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

__all__ = ["SkipFailedCollate", "TupleCollate", "collate_skip_failed", "format_failed", "split_failed"]

_WS = str.maketrans({"\t": " ", "\n": " ", "\r": " "})


def format_failed(path: str, reason: str) -> str:
    """``"<path>\t<reason>"`` (one line, exactly one tab)."""
    return f"{str(path).translate(_WS)}\t{str(reason).translate(_WS)}"


def split_failed(entry: str) -> tuple[str, str]:
    """Inverse of :func:`format_failed`: ``(path, reason)``."""
    path, _, reason = entry.partition("\t")
    return path, reason


def collate_skip_failed(samples: Sequence[dict[str, Any]], image_shape: Sequence[int] | None = None) -> dict[str, Any]:
    ok = [s for s in samples if s.get("image") is not None]
    failed = [
        format_failed(*s["failed"])
        if s.get("failed") is not None
        else format_failed(f"<index {s.get('index')}>", "no image")
        for s in samples
        if s.get("image") is None
    ]
    if ok:
        # default_collate stacks into shared memory inside DataLoader workers (no extra copy)
        images = default_collate([s["image"] for s in ok])
    else:
        shape = tuple(image_shape) if image_shape is not None else (3, 0, 0)
        images = torch.empty((0, *shape), dtype=torch.float32)
    return {
        "image": images,
        "label": torch.tensor([int(s["label"]) for s in ok], dtype=torch.long),
        "index": torch.tensor([int(s["index"]) for s in ok], dtype=torch.long),
        "failed": failed,
    }


class SkipFailedCollate:
    """Picklable ``collate_fn`` (workers may be spawned); ``image_shape`` = ``(C, H, W)`` of an empty batch."""

    def __init__(self, image_shape: Sequence[int] | None = None):
        self.image_shape = tuple(int(x) for x in image_shape) if image_shape is not None else None

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_skip_failed(samples, self.image_shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_shape={self.image_shape})"


class TupleCollate:
    """``collate_fn`` for batches of whole tuples (CFCD stage 2, :class:`~datamodules.tuple_sampler.TupleBatchSampler`).

    The samples come in tuple order ``[a, p, n_1..n_G, a', ...]`` of ``tuple_size = 2 + G``
    images. A tuple with any unreadable image is dropped whole (its other images are not listed
    as failed: they were read), so the batch keeps its tuple structure; the failed images are
    listed in ``"failed"`` as :class:`SkipFailedCollate` lists them. Adds ``"tuple_size"`` (int)
    to the batch; ``B`` is a multiple of it (0 when every tuple failed).
    """

    def __init__(self, tuple_size: int, image_shape: Sequence[int] | None = None):
        if tuple_size < 3:
            raise ValueError(f"a tuple holds an anchor, a positive and at least one negative, got tuple_size={tuple_size}")
        self.tuple_size = int(tuple_size)
        self.image_shape = tuple(int(x) for x in image_shape) if image_shape is not None else None

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if len(samples) % self.tuple_size:
            raise ValueError(f"{len(samples)} samples do not make whole tuples of {self.tuple_size}")
        kept, failed = [], []
        for start in range(0, len(samples), self.tuple_size):
            one = samples[start : start + self.tuple_size]
            if all(s.get("image") is not None for s in one):
                kept.extend(one)
            else:
                failed.extend(s for s in one if s.get("image") is None)
        batch = collate_skip_failed(kept, self.image_shape)
        batch["failed"] = collate_skip_failed(failed, self.image_shape)["failed"]
        batch["tuple_size"] = self.tuple_size
        return batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tuple_size={self.tuple_size}, image_shape={self.image_shape})"
