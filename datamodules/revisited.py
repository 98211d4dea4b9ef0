"""Revisited Oxford/Paris evaluation images (and any data set in the same format).

Layout (docs/design.md §5)::

    <root>/<name>/gnd_<name>.pkl      imlist, qimlist, gnd[{bbx, easy, hard, junk}]
    <root>/<name>/jpg/<image>.jpg     queries and database images

Every dataset here is made for one evaluation protocol (:mod:`sg_train.eval_protocols`,
``protocol``: "revisitop" by default, or "superglobal"), which fixes its geometry. Queries are
cropped to their ``bbx`` = [x1, y1, x2, y2] (original pixel coordinates, x2/y2 exclusive) before
anything else, with the protocol's rounding: ``int(round(v))`` under "revisitop" (Pillow's
``Image.crop`` in revisitop's ``python/example_process_images.py`` and cirtorch's
``ImagesFromList``), ``int(v)`` under "superglobal" (SuperGlobal/CVNet ``test/dataset.py``:
``im[int(y1):int(y2), int(x1):int(x2)]``). Then, when the protocol's ``max_size`` is set and
the longest side exceeds it, the image is shrunk (aspect kept, INTER_AREA) so that the longest
side equals ``max_size``; smaller images are never enlarged (neither published protocol caps the
size; a cap makes the protocol "custom"). Finally pixels are normalised as the model expects:
``(pixels / 255 - mean) / std`` in the model's channel order (``input_format`` "rgb", or "bgr"
for CVNet weights); a protocol that fixes the colours refuses a normalisation that contradicts
them (:meth:`~sg_train.eval_protocols.EvalProtocol.check_colours`) at construction.

Every item is ``(image float tensor (3, H, W), index)``. :meth:`EvalImageDataset.image_sizes`
gives each item's (H, W) from the image headers alone (EXIF orientation included), so that
extraction can batch equal sizes without decoding anything; ``__getitem__`` checks that the
decoded image agrees and fails naming the file when it does not.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sg_train.errors import OptionError, UserInputError
from sg_train.eval_protocols import EvalProtocol, resolve_protocol
from sg_train.image_io import ImageReadError, read_image
from sg_train.progress import progress_bar
from sg_train.retrieval import load_gnd

from .transforms import build_eval_transform, resolve_normalization

__all__ = [
    "SPLITS",
    "EvalImageDataset",
    "ImageSizeMismatchError",
    "QueryBoxError",
    "RevisitedDataset",
    "fit_longest_side",
    "read_image_size",
    "read_image_sizes",
]

SPLITS = ("query", "database")
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


class QueryBoxError(UserInputError):
    """A query box that does not describe a non-empty region inside its image."""


class ImageSizeMismatchError(ImageReadError):
    """A decoded image whose size differs from what its header said (the file changed)."""


# ---------------------------------------------------------------------------- geometry
def fit_longest_side(height: int, width: int, max_size: int | None) -> tuple[int, int]:
    """``(H, W)`` after shrinking so the longest side is ``max_size``; unchanged if it fits.

    The longest side becomes exactly ``max_size``; the other is ``round(side * max_size /
    longest)`` (half up, computed in integers, at least 1). Hand-written rather than
    albumentations' LongestMaxSize because that one also enlarges small images and computes
    ``int(side * scale)`` in floating point, which can lose a pixel on the longest side.
    """
    if max_size is None or max(height, width) <= max_size:
        return int(height), int(width)
    longest = max(height, width)

    def fit(side: int) -> int:
        return max(1, (2 * side * max_size + longest) // (2 * longest))

    return fit(height), fit(width)


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(H, W)`` of an image as :func:`read_image` will decode it, from the header only.

    EXIF orientations 5-8 swap the two sides (``read_image`` applies the orientation).
    Raises :class:`ImageReadError` naming the file.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION)
            except Exception:  # a broken EXIF block: read_image ignores it as well
                orientation = None
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(path, f"unreadable header: {e}") from None
    if width < 1 or height < 1:
        raise ImageReadError(path, f"empty image ({width} x {height})")
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return int(height), int(width)


def read_image_sizes(
    paths: Sequence[str | os.PathLike], *, threads: int | None = None, progress: bool = False, decode: bool = False
) -> tuple[np.ndarray, dict[int, str]]:
    """Sizes of many images: ``(sizes (n, 2) int64 (H, W) with -1 rows for failures,
    {position: reason})``, read in a thread pool (hides file-system latency).

    ``decode=False`` reads headers only (:func:`read_image_size`); ``decode=True`` decodes every
    image whole with :func:`~sg_train.image_io.read_image`, which also catches a file cut short or
    damaged after an intact header (slower: use it for the images evaluated every epoch).
    """
    sizes = np.full((len(paths), 2), -1, dtype=np.int64)
    errors: dict[int, str] = {}

    def one(i: int) -> None:
        try:
            sizes[i] = read_image(paths[i]).shape[:2] if decode else read_image_size(paths[i])
        except ImageReadError as e:
            errors[i] = e.reason

    workers = threads or min(8, 4 * (os.cpu_count() or 1))
    desc = "decoding images" if decode else "image headers"
    with progress_bar(total=len(paths), desc=desc, unit="img", enabled=progress, leave=False) as bar:
        if len(paths) < 64 or workers <= 1:
            for i in range(len(paths)):
                one(i)
                bar.update()
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(one, range(len(paths))):
                    bar.update()
    return sizes, errors


# ---------------------------------------------------------------------------- base dataset
class EvalImageDataset(Dataset):
    """Evaluation images from a list of files, optionally cropped, shrunk and normalised.

    Args:
        paths: image files, one per item.
        boxes: per item an integer crop ``(x1, y1, x2, y2)`` (x2/y2 exclusive) or None; the
            boxes must already be checked against the image sizes.
        mean, std, input_format: the model's normalisation (see :mod:`datamodules.transforms`).
        protocol: the evaluation protocol (name or ``EvalProtocol``) whose ``max_size`` applies.
        max_size: None: the protocol's size cap; a number: the longest side after shrinking,
            which makes the protocol its "custom" variant when it differs.

    Attributes: ``protocol`` (the resolved one, what extraction and cache keys read),
    ``max_size``, ``mean``, ``std``, ``input_format``, ``paths``, ``boxes``.

    Raises :class:`~sg_train.eval_protocols.ProtocolError` for an unknown protocol, a bad
    ``max_size``, or colours the protocol fixes and the normalisation contradicts.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        boxes: Sequence[tuple[int, int, int, int] | None] | None = None,
        *,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        input_format: Literal["rgb", "bgr"] = "rgb",
        protocol: str | EvalProtocol = "revisitop",
        max_size: int | None = None,
    ) -> None:
        self.protocol = resolve_protocol(protocol, max_size=max_size)
        self.paths: list[str] = [os.fspath(p) for p in paths]  # str, not Path: 1M of them stay small
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.paths)
        if len(self.boxes) != len(self.paths):
            raise ValueError(f"{len(self.boxes)} boxes for {len(self.paths)} images")
        self.max_size = self.protocol.max_size
        self.mean, self.std = resolve_normalization(mean, std, input_format)
        self.input_format = str(input_format).lower()
        self.protocol.check_colours(self.input_format, self.mean, self.std, what="the normalisation given to the "
                                    f"{type(self).__name__} (the model's)")
        self._transform = build_eval_transform(None, mean=self.mean, std=self.std, input_format=self.input_format)
        self._source_sizes: np.ndarray | None = None  # (n, 2) header sizes, read on demand

    # -- sizes --------------------------------------------------------------------------
    def _set_source_sizes(self, sizes: np.ndarray) -> None:
        self._source_sizes = np.asarray(sizes, dtype=np.int64).reshape(len(self.paths), 2)

    def source_sizes(self) -> np.ndarray:
        """``(n, 2)`` (H, W) of the files as decoded (headers only; read once, then kept)."""
        if self._source_sizes is None:
            sizes, errors = read_image_sizes(self.paths)
            if errors:
                i = min(errors)
                raise ImageReadError(self.paths[i], errors[i] + (
                    f" (and {len(errors) - 1} more unreadable images)" if len(errors) > 1 else ""))
            self._set_source_sizes(sizes)
        return self._source_sizes

    def _item_size(self, i: int, height: int, width: int) -> tuple[int, int]:
        box = self.boxes[i]
        if box is not None:
            height, width = box[3] - box[1], box[2] - box[0]
        return fit_longest_side(height, width, self.max_size)

    def image_sizes(self) -> list[tuple[int, int]]:
        """``(H, W)`` of every item after crop and resize, from image headers (no decoding)."""
        src = self.source_sizes()
        return [self._item_size(i, int(h), int(w)) for i, (h, w) in enumerate(src)]

    # -- items --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        """Item ``i`` as an RGB uint8 array, cropped and resized (before normalisation)."""
        path = self.paths[i]
        img = read_image(path)
        if self._source_sizes is not None:
            expected = tuple(int(v) for v in self._source_sizes[i])
            if img.shape[:2] != expected:
                raise ImageSizeMismatchError(path, f"decoded size {img.shape[0]} x {img.shape[1]} differs from the "
                                                   f"header's {expected[0]} x {expected[1]} (file changed?)")
        box = self.boxes[i]
        if box is not None:
            x1, y1, x2, y2 = box
            if x2 > img.shape[1] or y2 > img.shape[0]:
                raise ImageSizeMismatchError(path, f"crop box {list(box)} does not fit the decoded image "
                                                   f"({img.shape[1]} x {img.shape[0]} W x H)")
            img = img[y1:y2, x1:x2]
        h, w = fit_longest_side(img.shape[0], img.shape[1], self.max_size)
        if (h, w) != img.shape[:2]:
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)  # only ever shrinks
        return np.ascontiguousarray(img)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        return self._transform(image=self.load(i))["image"], i

    # -- identity -----------------------------------------------------------------------
    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"input_format": self.input_format, "mean": list(self.mean), "std": list(self.std),
                "max_size": self.max_size}

    def describe(self) -> dict[str, Any]:
        """What decides the pixels fed to the model (for cache keys); see descriptor_cache."""
        return {"class": type(self).__name__, "preprocessing": self.preprocessing,
                "eval_protocol": self.protocol.describe(), "boxes": [None if b is None else list(b) for b in self.boxes]}


# ---------------------------------------------------------------------------- Revisited
class RevisitedDataset(EvalImageDataset):
    """Queries (cropped to bbx) or database images of a Revisited-format data set.

    Args:
        root: folder holding ``<name>/gnd_<name>.pkl`` and ``<name>/jpg/``.
        name: data set name, e.g. "roxford5k", "rparis6k", "rsynth".
        split: "query" or "database".
        mean, std, input_format: the model's normalisation (``EmbeddingModel.mean`` etc.).
        protocol: the evaluation protocol, "revisitop" (default) or "superglobal" (or an
            ``EvalProtocol``): query crop rounding, size cap, and colours where it fixes them.
        max_size: None: the protocol's size cap (none for both published protocols); a number:
            the longest side after shrinking, which makes the protocol "custom".

    Attributes: ``gnd`` (the validated ground truth of :func:`sg_train.retrieval.load_gnd`),
    ``names`` (image names of this split), ``name``, ``split``, ``gnd_path``, ``paths``,
    ``protocol``.

    Raises at construction: ``FileNotFoundError`` for a missing ground truth or images (naming
    them), :class:`QueryBoxError` for a query box outside its image or empty once rounded,
    :class:`ImageReadError` for a query image whose header cannot be read,
    :class:`~sg_train.eval_protocols.ProtocolError` as :class:`EvalImageDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        name: str,
        split: Literal["query", "database"],
        *,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        input_format: Literal["rgb", "bgr"] = "rgb",
        protocol: str | EvalProtocol = "revisitop",
        max_size: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise OptionError(f"split must be one of {SPLITS}, got {split!r}")
        protocol = resolve_protocol(protocol, max_size=max_size)
        self.root = Path(root)
        self.name = str(name)
        self.split = split
        self.gnd_path = self.root / self.name / f"gnd_{self.name}.pkl"
        if not self.gnd_path.is_file():
            raise FileNotFoundError(f"ground truth of data set {self.name!r} not found: {self.gnd_path} "
                                    f"(expected <root>/<name>/gnd_<name>.pkl)")
        self.gnd = load_gnd(self.gnd_path)
        self.names: list[str] = list(self.gnd["qimlist"] if split == "query" else self.gnd["imlist"])
        image_dir = self.root / self.name / "jpg"
        paths = [image_dir / f"{n}.jpg" for n in self.names]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise FileNotFoundError(f"{self.name} {split}: {len(missing)} of {len(paths)} images missing: {shown}{more}")

        boxes: list[tuple[int, int, int, int] | None] | None = None
        source_sizes = None
        if split == "query":
            source_sizes = np.array([read_image_size(p) for p in paths], dtype=np.int64).reshape(-1, 2)
            boxes = [self._query_box(qi, paths[qi], source_sizes[qi], protocol) for qi in range(len(paths))]
        super().__init__(paths, boxes, mean=mean, std=std, input_format=input_format, protocol=protocol)
        if source_sizes is not None:
            self._set_source_sizes(source_sizes)

    def _query_box(self, qi: int, path: Path, size: np.ndarray,
                   protocol: EvalProtocol) -> tuple[int, int, int, int] | None:
        bbx = self.gnd["gnd"][qi].get("bbx")
        if bbx is None:
            return None  # a query without a box is used whole
        height, width = int(size[0]), int(size[1])
        x1, y1, x2, y2 = protocol.crop_box(bbx)
        where = f"{self.name} query {qi} ({self.names[qi]!r}, {path})"
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise QueryBoxError(f"{where}: bbx {list(bbx)} (rounded {[x1, y1, x2, y2]}) lies outside the image "
                                f"of {width} x {height} (W x H)")
        if x2 - x1 < 1 or y2 - y1 < 1:
            raise QueryBoxError(f"{where}: bbx {list(bbx)} is empty once rounded to pixels ({[x1, y1, x2, y2]}, "
                                f"protocol {protocol.name!r}, bbx_rounding={protocol.bbx_rounding!r})")
        return x1, y1, x2, y2

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(name=self.name, split=self.split, names=self.names)
        return out

    def __repr__(self) -> str:
        return (f"RevisitedDataset(name={self.name!r}, split={self.split!r}, images={len(self)}, "
                f"protocol={self.protocol.name!r}, max_size={self.max_size}, input_format={self.input_format!r})")
