"""The revisitop 1M distractors (R1M): ``<root>/revisitop1m.txt`` and ``<root>/jpg/<line>``.

The list holds one relative path per line, extension included (e.g. ``b9/b9f73fdf64c26a6d.jpg``);
the revisitop reference code (``python/dataset.py``, dataset "revisitop1m") reads it with
``read().splitlines()``, uses an empty extension, and opens ``<root>/jpg/<line>``. Row ``r`` of
everything derived from the list is line ``r`` of the file.

Some listed files are missing from the published archives (and some may be unreadable): at
construction every file's header is read (threaded); those that are missing or whose header
cannot be read are reported (``missing`` + one warning with the counts) and are not items of
the data set. ``valid_indices[i]`` is the list row of item ``i``.

Distractors are read as published (longest side at most 1024) under both published evaluation
protocols: SuperGlobal's ``test/dataset_1m.py`` feeds each ``cv2.imread`` image whole
(``_scale_list = [1.]``; ``extract_rop1m.py`` then takes the same three scales as for the
benchmark), and revisitop's ``python/example_process_distractors.py`` reads them whole too. The
protocol's ``max_size`` (None for both) applies, and the protocol travels with the data set to
extraction and cache keys.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sg_train.eval_protocols import EvalProtocol, resolve_protocol

from .revisited import EvalImageDataset, read_image_sizes

__all__ = ["R1M_LIST", "R1MDataset", "MissingImagesWarning"]

R1M_LIST = "revisitop1m.txt"


class MissingImagesWarning(UserWarning):
    """Listed images that are missing or unreadable and therefore skipped."""


class R1MDataset(EvalImageDataset):
    """R1M distractor images, preprocessed under an evaluation protocol.

    Args:
        root: the ``revisitop1m`` folder (holding ``revisitop1m.txt`` and ``jpg/``).
        mean, std, input_format: the model's normalisation.
        protocol: the evaluation protocol, as for the benchmark the distractors join
            ("revisitop", "superglobal" or an ``EvalProtocol``).
        max_size: None: the protocol's size cap (none: the published files' longest side is
            already 1024); a number: shrink to it, which makes the protocol "custom".
        list_file: the list's file name inside ``root``.
        progress: a progress bar while the headers are read (about a minute for 1M files).

    Attributes: ``names`` (every listed line, in order), ``valid_indices`` (int64, list row of
    each item), ``valid_mask`` (bool per listed row), ``missing`` (``[(row, name, reason)]``),
    ``paths`` (one file per item), ``root``, ``list_path``, ``protocol``.

    Raises ``FileNotFoundError`` for a missing list or when no listed image is readable, and
    :class:`~sg_train.eval_protocols.ProtocolError` as :class:`~datamodules.revisited.EvalImageDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        input_format: Literal["rgb", "bgr"] = "rgb",
        protocol: str | EvalProtocol = "revisitop",
        max_size: int | None = None,
        list_file: str = R1M_LIST,
        progress: bool = False,
    ) -> None:
        protocol = resolve_protocol(protocol, max_size=max_size)  # a bad name fails before a million headers
        self.root = Path(root)
        self.name = "revisitop1m"
        self.split = "database"
        self.list_path = self.root / list_file
        if not self.list_path.is_file():
            raise FileNotFoundError(f"R1M image list not found: {self.list_path} (expected <root>/{list_file} "
                                    "beside <root>/jpg/)")
        self.names: list[str] = self.list_path.read_text(encoding="utf-8").splitlines()
        image_dir = os.fspath(self.root / "jpg")
        self.missing: list[tuple[int, str, str]] = []
        candidates: list[int] = []
        candidate_paths: list[str] = []
        for row, line in enumerate(self.names):
            reason = _bad_line(line)
            if reason is None:
                candidates.append(row)
                candidate_paths.append(os.path.join(image_dir, line))
            else:
                self.missing.append((row, line, reason))

        sizes, errors = read_image_sizes(candidate_paths, progress=progress)
        keep = np.ones(len(candidates), dtype=bool)
        for pos, reason in errors.items():
            keep[pos] = False
            self.missing.append((candidates[pos], self.names[candidates[pos]], reason))
        self.missing.sort()
        self.valid_indices = np.asarray(candidates, dtype=np.int64)[keep]
        self.valid_mask = np.zeros(len(self.names), dtype=bool)
        self.valid_mask[self.valid_indices] = True
        paths = [p for p, k in zip(candidate_paths, keep) if k]
        super().__init__(paths, None, mean=mean, std=std, input_format=input_format, protocol=protocol)
        self._set_source_sizes(sizes[keep])
        if self.missing:
            shown = "; ".join(f"line {r + 1} {n!r}: {why}" for r, n, why in self.missing[:3])
            warnings.warn(f"{self.list_path}: {len(self.missing)} of {len(self.names)} listed images are missing or "
                          f"unreadable and are skipped ({len(self)} usable); first: {shown}",
                          MissingImagesWarning, stacklevel=2)
        if len(self) == 0:
            raise FileNotFoundError(f"{self.list_path}: none of the {len(self.names)} listed images is readable "
                                    f"under {image_dir}")

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        del out["boxes"]  # never cropped
        out.update(name=self.name, names=self.names, valid_indices=self.valid_indices.tolist(),
                   missing=[list(m) for m in self.missing])
        return out

    def __repr__(self) -> str:
        return (f"R1MDataset(root={str(self.root)!r}, listed={len(self.names)}, images={len(self)}, "
                f"missing={len(self.missing)}, protocol={self.protocol.name!r}, max_size={self.max_size}, "
                f"input_format={self.input_format!r})")


def _bad_line(line: str) -> str | None:
    if not line.strip():
        return "blank line"
    if os.path.isabs(line):
        return "absolute path (lines must be relative to jpg/)"
    if os.path.normpath(line).split(os.sep)[0] == os.pardir:
        return "path leaves the jpg/ folder"
    return None
