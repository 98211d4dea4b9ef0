"""Reading a database matrix in row chunks, from a torch tensor, a numpy array or a disk-backed
``np.memmap`` (e.g. 1M x 2048 fp16 R1M descriptors), with bounded memory.

Pages of a memory map that a chunk touched are handed back to the kernel once the chunk is done
(``madvise(MADV_DONTNEED)`` on shared, read-only or read-write maps; the data stays in the page
cache), so a full pass over a 4 GB map does not leave 4 GB resident in the process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
import warnings
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["iter_row_chunks", "take_rows", "auto_chunk_rows", "to_tensor"]

_PAGE = mmap.PAGESIZE
_GATHER_BATCH = 1024  # rows per batch when gathering scattered rows from a memory map
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
_libc = None
if sys.platform.startswith("linux") and _MADV_DONTNEED is not None:
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):  # pragma: no cover - platform without madvise
        _libc = None


def auto_chunk_rows(dim: int, budget_bytes: int = 64 << 20, itemsize: int = 4, minimum: int = 256) -> int:
    """Rows per chunk so that one chunk in the compute dtype stays within ``budget_bytes``."""
    return max(minimum, budget_bytes // max(1, dim * itemsize))


def to_tensor(a) -> torch.Tensor:
    """A numpy array (read-only memmaps included) as a tensor without copying; tensors pass through."""
    if isinstance(a, torch.Tensor):
        return a
    with warnings.catch_warnings():  # read-only maps: we never write through the tensor
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(a))


def _release_pages(chunk: np.ndarray) -> None:
    """Drop this process's mapping of the pages under ``chunk`` (a slice of a shared memmap)."""
    if _libc is None or chunk.nbytes == 0 or not chunk.flags.c_contiguous:
        return
    start = chunk.__array_interface__["data"][0]
    lo = -(-start // _PAGE) * _PAGE  # whole pages inside the chunk only
    hi = ((start + chunk.nbytes) // _PAGE) * _PAGE
    if hi > lo:
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _is_shared_memmap(a) -> bool:
    # mode "c" is a private copy-on-write map: dropping its pages would drop the user's edits.
    return isinstance(a, np.memmap) and getattr(a, "mode", "c") in ("r", "r+", "w+")


def iter_row_chunks(X, chunk_rows: int, *, device: torch.device, dtype: torch.dtype
                    ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, rows)`` with ``rows = X[start:start + chunk_rows]`` as ``dtype`` on ``device``.

    Rows that need a conversion (dtype or device) are converted into one reused buffer, so each
    yielded tensor is valid only until the next one is requested.
    """
    n = int(X.shape[0])
    shared_map = _is_shared_memmap(X)
    buffer = None
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        part = X[start:stop]
        src = to_tensor(part)
        if src.dtype == dtype and src.device == device:
            yield start, src
        else:
            if buffer is None:
                buffer = torch.empty((min(chunk_rows, n), int(X.shape[1])), device=device, dtype=dtype)
            rows = buffer[: stop - start]
            rows.copy_(src)
            yield start, rows
        if shared_map:  # the consumer is done with this chunk
            _release_pages(part)


def take_rows(X, index: torch.Tensor, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``X[index]`` (any index shape) as ``dtype`` on ``device``; X a tensor, array or memmap.

    From an array or memory map each distinct row is read once, in ascending order.
    """
    if isinstance(X, torch.Tensor):
        return X[index.to(X.device)].to(device=device, dtype=dtype)
    rows, where = np.unique(index.reshape(-1).cpu().numpy(), return_inverse=True)
    if _is_shared_memmap(X):
        # The kernel maps the pages around each row read (fault-around), so a scattered gather
        # from a big map would leave most of it resident: read in batches, hand pages back.
        table = torch.empty((rows.shape[0], X.shape[1]), device=device, dtype=dtype)
        for a in range(0, rows.shape[0], _GATHER_BATCH):
            part = rows[a:a + _GATHER_BATCH]
            table[a:a + part.shape[0]] = to_tensor(np.asarray(X[part])).to(device=device, dtype=dtype)
            _release_pages(X[part[0]:part[-1] + 1])
    else:
        table = to_tensor(np.asarray(X[rows])).to(device=device, dtype=dtype)
    return table[torch.from_numpy(where.reshape(-1)).to(device)].reshape(*index.shape, X.shape[1])
