"""A map-style dataset over ``(name, label)`` rows that never raises for a bad image file.

Items are fetched by index, or by ``(index, augmentation_seed)`` as
:class:`~datamodules.sampler.SeededSampler` hands them out: the pipeline's RNG is then re-seeded
with that seed first, so a sample's augmentation depends on nothing but its seed.

A sample is a dict ``{"image", "label", "index", "failed"}``. When the file cannot be read
(:class:`~sg_train.image_io.ImageReadError`), ``image`` is ``None`` and ``failed`` is
``(path, reason)``; :class:`~datamodules.collate.SkipFailedCollate` drops such samples and
lists them in the batch's ``"failed"`` (as ``"<path>\t<reason>"`` strings). Errors raised by
the transform are *not* swallowed (they are bugs, not bad files); they are re-raised naming
the file.

Names and labels are kept as compact numpy arrays (fixed-width bytes, ``int64``), not
Python lists, so forked DataLoader workers do not copy millions of objects.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from sg_train.image_io import ImageReadError, read_image

__all__ = ["ImageDataset", "compact_strings", "pixel_box", "worker_init_fn"]


def compact_strings(values: Sequence[str] | np.ndarray) -> np.ndarray:
    """Strings as a fixed-width ``S`` array (ASCII) or ``U`` array (anything else)."""
    arr = np.asarray(values)
    if arr.dtype.kind == "S":
        return arr
    try:
        return arr.astype(str).astype(np.bytes_)
    except UnicodeEncodeError:
        return arr.astype(str)


def pixel_box(box) -> tuple[int, int, int, int] | None:
    """A box ``x1, y1, x2, y2`` (floats, pixels, x2/y2 exclusive) as whole pixels, each rounded half
    up as revisitop crops its queries; None for a box with a NaN (no box: the whole image)."""
    values = np.asarray(box, dtype=np.float64)
    if np.isnan(values).any():
        return None
    x1, y1, x2, y2 = (int(v) for v in np.floor(values + 0.5))
    return x1, y1, x2, y2


def join_path(root: str, name: str) -> str:
    """Default ``path_fn``: ``os.path.join(root, name)``."""
    return os.path.join(root, name)


class ImageDataset(Dataset):
    """Images at ``path_fn(root, names[i])`` with integer ``labels[i]``.

    Args:
        names: file names/ids, one per sample.
        labels: integer label per sample (``-1`` where there is none).
        root: folder the names are relative to.
        transform: albumentations-style callable, ``transform(image=rgb_uint8)["image"]``;
            ``None`` returns the RGB image as a ``uint8`` ``(3, H, W)`` tensor.
        path_fn: ``path_fn(root, name) -> path``; a module-level function (picklable).
        boxes: optional float ``(N, 4)`` crop ``x1, y1, x2, y2`` in pixels of the decoded image
            (x2/y2 exclusive, rounded half up as revisitop rounds query boxes; a NaN row: the whole
            image), applied before the transform. A box that does not fit its image makes the
            sample fail (reported like an unreadable file), not the epoch.
    """

    def __init__(
        self,
        names: Sequence[str] | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        root: str | os.PathLike = "",
        transform: Callable[..., dict[str, Any]] | None = None,
        path_fn: Callable[[str, str], str] = join_path,
        boxes: np.ndarray | None = None,
    ):
        self.names = compact_strings(names)
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.names.ndim != 1 or self.labels.shape != self.names.shape:
            raise ValueError(
                f"names and labels must be 1-D of equal length, got {self.names.shape} and {self.labels.shape}"
            )
        self.root = os.fspath(root)
        self.transform = transform
        self.path_fn = path_fn
        self.boxes = None if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(len(self.names), 4)

    def __len__(self) -> int:
        return len(self.names)

    def name(self, index: int) -> str:
        n = self.names[index]
        return n.decode() if isinstance(n, bytes) else str(n)

    def path(self, index: int) -> str:
        return self.path_fn(self.root, self.name(index))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        index = int(index)
        path = self.path(index)
        sample: dict[str, Any] = {"image": None, "label": int(self.labels[index]), "index": index, "failed": None}
        try:
            img = read_image(path)
            img = self._crop(index, img)
        except ImageReadError as e:
            sample["failed"] = (e.path, e.reason)
            return sample
        if self.transform is None:
            sample["image"] = torch.from_numpy(img).permute(2, 0, 1).contiguous()
            return sample
        if seed is not None:
            self.reseed(seed)
        try:
            sample["image"] = self.transform(image=img)["image"]
        except Exception as e:
            raise RuntimeError(
                f"transform failed on image {path!r} (shape {img.shape}): {type(e).__name__}: {e}"
            ) from e
        return sample

    def _crop(self, index: int, img: np.ndarray) -> np.ndarray:
        box = None if self.boxes is None else pixel_box(self.boxes[index])
        if box is None:
            return img
        x1, y1, x2, y2 = box
        height, width = img.shape[:2]
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise ImageReadError(self.path(index), f"box {self.boxes[index].tolist()} does not fit the image "
                                                   f"({width} x {height} W x H)")
        return img[y1:y2, x1:x2]

    def reseed(self, seed: int) -> None:
        """Re-seed the transform's own RNG (albumentations 2.x keeps one per pipeline).

        One numpy and one Python generator are shared by every transform of the pipeline, so
        their draws follow each other. (``Compose.set_random_seed`` would give each transform
        its own generator with the *same* seed, so that e.g. the crop scale and the flip
        decision came from the same first number.)
        """
        set_state = getattr(self.transform, "set_random_state", None)
        if callable(set_state):
            set_state(np.random.default_rng(int(seed)), random.Random(int(seed)))


def worker_init_fn(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: distinct augmentations per worker, rank and epoch.

    albumentations 2.x pipelines carry their own RNG, which forked workers would otherwise
    inherit identically (same crops in every worker, and every epoch when workers are not
    persistent). ``torch.initial_seed()`` in a worker already differs per worker and epoch;
    ``rank`` (bind it with ``functools.partial``) separates DDP ranks. Also turns off
    OpenCV's own thread pool inside workers (the workers are the parallelism).
    """
    import cv2

    cv2.setNumThreads(0)
    info = get_worker_info()
    if info is None:
        return
    seed = int(np.random.SeedSequence([torch.initial_seed() % (1 << 63), int(rank), worker_id]).generate_state(1)[0])
    ds = info.dataset
    while ds is not None:  # unwrap Subset-like wrappers
        if hasattr(ds, "reseed"):
            ds.reseed(seed)
            break
        ds = getattr(ds, "dataset", None)
