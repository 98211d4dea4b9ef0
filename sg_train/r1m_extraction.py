"""Resumable extraction of the 1M distractor descriptors into a memory-mapped file.

Layout of ``out_dir``::

    meta.json                 model and dataset fingerprints, rows N, dim D, chunk size, dtype,
                              scales, the listed-but-missing images; written once, last at set-up
    names.txt                 the image list (row r = line r of revisitop1m.txt)
    descriptors.f16           raw (N, D) float16 memmap (descriptors.f32 for float32); row r is
                              list line r; rows without a descriptor stay all zero
    chunks/<c>.json           done record of chunk c (rows [c*chunk, (c+1)*chunk)): images that
                              failed to decode and a BLAKE2b digest of the chunk's rows

A chunk's rows are flushed (``msync``) before its record is written (atomically), so a record
always describes rows that are on disk; a run that dies (even by SIGKILL) loses at most the
chunk in progress, and the next run with the same model and data resumes from the first chunk
without a record. Finished chunks are checked against their digests on resume and recomputed
(with a warning) if their rows were damaged. A different model, dataset, chunk size, dtype or
scales in the same ``out_dir`` is refused with an error naming what differs; nothing is ever
overwritten silently. One process at a time: an advisory lock guards ``out_dir``.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .descriptor_cache import dataset_fingerprint, model_fingerprint
from .errors import UserInputError
from .extraction import extract_descriptors
from .files import array_digest, atomic_write, write_json
from .progress import progress_bar

__all__ = ["R1MDescriptors", "R1MExtractionError", "R1MChunkWarning", "extract_r1m"]

FORMAT = "sg-train-r1m-descriptors"
VERSION = 1
META = "meta.json"
NAMES = "names.txt"
CHUNKS = "chunks"
DATA_FILES = {"float16": "descriptors.f16", "float32": "descriptors.f32"}


class R1MExtractionError(UserInputError):
    """An ``out_dir`` that belongs to another extraction, is incomplete, or is damaged."""


class R1MChunkWarning(UserWarning):
    """A finished chunk whose rows no longer match its record and is recomputed."""


# ---------------------------------------------------------------------------- result
@dataclass(frozen=True)
class R1MDescriptors:
    """Finished R1M descriptors.

    Attributes:
        out_dir: the extraction folder.
        descriptors: read-only ``np.memmap`` (N, D), row r = line r of the image list; rows
            without a descriptor (``~valid_mask``) are all zero: leave them out of searches.
        valid_mask: bool (N,), True where the row holds a descriptor.
        names: the listed image paths (N).
        missing: ``[(row, name, reason)]`` of rows without a descriptor (missing files, headers
            or pixels that could not be read).
        meta: the contents of ``meta.json``.
    """

    out_dir: Path
    descriptors: np.memmap
    valid_mask: np.ndarray
    names: list[str]
    missing: list[tuple[int, str, str]]
    meta: dict[str, Any]

    @property
    def valid_indices(self) -> np.ndarray:
        """Rows that hold a descriptor (int64, ascending)."""
        return np.flatnonzero(self.valid_mask)

    @classmethod
    def open(cls, out_dir: str | os.PathLike, *, model: nn.Module | None = None) -> "R1MDescriptors":
        """Open a finished extraction; ``R1MExtractionError`` if it is incomplete or damaged, or
        (when ``model`` is given) was made by another model."""
        out_dir = Path(out_dir)
        meta = _read_meta(out_dir)
        if meta is None:
            raise R1MExtractionError(f"{out_dir} holds no R1M extraction ({META} missing)")
        if model is not None and model_fingerprint(model) != meta["model"]:
            raise R1MExtractionError(f"{out_dir} holds R1M descriptors of another model (fingerprint differs)")
        pending = [c for c in range(meta["chunks"]) if _read_record(out_dir, c) is None]
        if pending:
            raise R1MExtractionError(f"R1M extraction in {out_dir} is incomplete: {len(pending)} of {meta['chunks']} "
                                     f"chunks not finished (first: {pending[:5]}); run extract_r1m again to resume")
        names = (out_dir / NAMES).read_text(encoding="utf-8").splitlines()
        if len(names) != meta["rows"]:
            raise R1MExtractionError(f"{out_dir / NAMES} has {len(names)} lines, {META} says {meta['rows']} rows")
        missing = [tuple(m) for m in meta["missing"]]
        for c in range(meta["chunks"]):
            missing += [tuple(m) for m in _read_record(out_dir, c)["failed"]]
        missing.sort()
        valid = np.ones(meta["rows"], dtype=bool)
        valid[[int(m[0]) for m in missing]] = False
        return cls(out_dir, _open_data(out_dir, meta, "r"), valid, names, missing, meta)


# ---------------------------------------------------------------------------- files
def _read_meta(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / META
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise R1MExtractionError(f"{path} is unreadable ({e}); move the folder away to start over") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise R1MExtractionError(f"{path} is not an R1M extraction record (format {FORMAT!r} expected)")
    return meta


def _record_path(out_dir: Path, chunk: int) -> Path:
    return out_dir / CHUNKS / f"{chunk:06d}.json"


def _read_record(out_dir: Path, chunk: int) -> dict[str, Any] | None:
    try:
        record = json.loads(_record_path(out_dir, chunk).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent (or, impossibly for an atomic write, unreadable): the chunk is redone
    return record if isinstance(record, dict) and record.get("chunk") == chunk else None


def _open_data(out_dir: Path, meta: dict[str, Any], mode: str) -> np.memmap:
    path = out_dir / meta["data_file"]
    shape = (int(meta["rows"]), int(meta["dim"]))
    expected = shape[0] * shape[1] * np.dtype(meta["dtype"]).itemsize
    size = path.stat().st_size if path.exists() else -1
    if size != expected:
        raise R1MExtractionError(f"{path} is {'missing' if size < 0 else f'{size} bytes'}, expected {expected} "
                                 f"bytes for {shape[0]} x {shape[1]} {meta['dtype']}")
    return np.memmap(path, dtype=meta["dtype"], mode=mode, shape=shape)


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    with open(out_dir / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise R1MExtractionError(f"another process is extracting into {out_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Items:
    """The items of ``dataset`` listed in ``items``, renumbered 0..len-1 (for one chunk)."""

    def __init__(self, dataset: Any, items: np.ndarray, sizes: Sequence[tuple[int, int]]) -> None:
        self.dataset, self.items = dataset, items
        self._sizes = [sizes[int(i)] for i in items]
        self.name = getattr(dataset, "name", "")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int):
        return self.dataset[int(self.items[j])][0], j

    def image_sizes(self) -> list[tuple[int, int]]:
        return self._sizes


# ---------------------------------------------------------------------------- extraction
def _describe_run(model: nn.Module, dataset: Any, dim: int, chunk_size: int, dtype: str,
                  scales: Sequence[float] | None) -> dict[str, Any]:
    rows = len(dataset.names)
    return {
        "format": FORMAT, "version": VERSION,
        "model": model_fingerprint(model), "dataset": dataset_fingerprint(dataset),
        "rows": rows, "dim": dim, "items": len(dataset), "chunk_size": chunk_size,
        "chunks": max(1, -(-rows // chunk_size)), "dtype": dtype, "data_file": DATA_FILES[dtype],
        "scales": None if scales is None else [float(s) for s in scales],
        "missing": [[int(r), n, why] for r, n, why in dataset.missing],
    }


_COMPARED = {"model": "model weights/preprocessing", "dataset": "dataset (list, files or preprocessing)",
             "rows": "row count", "dim": "descriptor size", "chunk_size": "chunk size", "dtype": "dtype",
             "scales": "scales", "version": "format version"}


def _prepare(out_dir: Path, want: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Check an existing extraction against ``want``, or set a new one up (data file, names, meta)."""
    have = _read_meta(out_dir)
    if have is not None:
        diff = [f"{label}: {have.get(k)!r} there, {want[k]!r} now" if k not in ("model", "dataset")
                else label for k, label in _COMPARED.items() if have.get(k) != want[k]]
        if diff:
            raise R1MExtractionError(f"{out_dir} holds an R1M extraction of something else ({'; '.join(diff)}); "
                                     "use another out_dir, or delete this one to start over")
        _open_data(out_dir, have, "r")  # size check
        return have
    leftovers = [p.name for p in (out_dir / DATA_FILES[want["dtype"]], out_dir / NAMES, out_dir / CHUNKS) if p.exists()]
    if leftovers:
        raise R1MExtractionError(f"{out_dir} has {leftovers} but no {META}: not a folder this code set up; "
                                 "refusing to overwrite it")
    size = want["rows"] * want["dim"] * np.dtype(want["dtype"]).itemsize
    atomic_write(out_dir / want["data_file"], lambda fh: fh.truncate(size))  # a sparse file of zeros
    atomic_write(out_dir / NAMES, lambda fh: fh.write("".join(f"{n}\n" for n in names).encode()))
    (out_dir / CHUNKS).mkdir(exist_ok=True)
    write_json(out_dir / META, want)
    return want


def extract_r1m(
    model: nn.Module,
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    scales: Sequence[float] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    chunk_size: int = 10000,
    dtype: Any = np.float16,
    progress: bool = True,
    verify: bool = True,
    on_chunk_done: Callable[[int], None] | None = None,
) -> R1MDescriptors:
    """Extract (or resume extracting) descriptors of an :class:`~datamodules.r1m.R1MDataset`.

    Args:
        model: an ``EmbeddingModel`` (needs ``embedding_dim`` and ``extract``), on ``device``.
        dataset: the R1M dataset (``names``, ``missing``, ``valid_indices``, ``paths`` ...).
        out_dir: the extraction folder (created; see the module docstring).
        scales, batch_size, num_workers, device: as :func:`sg_train.extraction.extract_descriptors`.
        chunk_size: list rows per chunk, the unit of resumption.
        dtype: storage type, float16 (default) or float32.
        progress: progress bars.
        verify: on resume, check finished chunks against their digests.
        on_chunk_done: called with the chunk number after each chunk is recorded.
    """
    dtype = np.dtype(dtype).name
    if dtype not in DATA_FILES:
        raise ValueError(f"dtype must be one of {sorted(DATA_FILES)}, got {dtype!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk_size = int(chunk_size)
    dim = getattr(model, "embedding_dim", None)
    if not isinstance(dim, int) or dim < 1:
        raise TypeError(f"model needs a positive int 'embedding_dim' (the descriptor size), got {dim!r}")
    rows_of_item = np.asarray(dataset.valid_indices, dtype=np.int64)
    if rows_of_item.shape != (len(dataset),):
        raise ValueError(f"dataset.valid_indices has {rows_of_item.shape[0]} rows for {len(dataset)} items")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir):
        meta = _prepare(out_dir, _describe_run(model, dataset, dim, chunk_size, dtype, scales), list(dataset.names))
        data = _open_data(out_dir, meta, "r+")
        sizes = dataset.image_sizes()
        todo = []
        for c in range(meta["chunks"]):
            r0, r1 = c * chunk_size, min(meta["rows"], (c + 1) * chunk_size)
            record = _read_record(out_dir, c)
            if record is not None and verify and record.get("digest") != array_digest(data[r0:r1]):
                warnings.warn(f"{out_dir}: rows {r0}-{r1 - 1} of finished chunk {c} do not match their record; "
                              "recomputing the chunk", R1MChunkWarning, stacklevel=2)
                record = None
            if record is None:
                todo.append(c)
        bar = progress_bar(total=len(todo), desc="R1M chunks", unit="chunk", enabled=progress)
        try:
            for c in todo:
                r0, r1 = c * chunk_size, min(meta["rows"], (c + 1) * chunk_size)
                lo, hi = np.searchsorted(rows_of_item, [r0, r1])
                items = np.arange(lo, hi)
                failed: list[list[Any]] = []

                def unreadable(j: int, err: Exception, items: np.ndarray = items) -> None:
                    row = int(rows_of_item[items[j]])
                    failed.append([row, dataset.names[row], getattr(err, "reason", str(err))])

                block = np.zeros((r1 - r0, dim), dtype=dtype)
                if len(items):
                    idx, desc = extract_descriptors(
                        model, _Items(dataset, items, sizes), scales=scales, batch_size=batch_size,
                        num_workers=num_workers, device=device, progress=progress,
                        desc=f"R1M chunk {c + 1}/{meta['chunks']}", on_unreadable=unreadable)
                    block[rows_of_item[items[idx.numpy()]] - r0] = desc.numpy().astype(dtype)
                data[r0:r1] = block
                data.flush()
                record = {"chunk": c, "rows": [r0, r1], "failed": sorted(failed), "digest": array_digest(block)}
                write_json(_record_path(out_dir, c), record)
                bar.update(1)
                if on_chunk_done is not None:
                    on_chunk_done(c)
        finally:
            bar.close()
        del data  # unmap before reopening read-only
    return R1MDescriptors.open(out_dir)
