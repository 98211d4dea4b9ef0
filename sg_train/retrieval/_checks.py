"""Input checks shared by the retrieval functions: every bad input is a clear error naming it."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import UserInputError

__all__ = ["RetrievalInputError", "ZeroRowTally", "check_descriptors", "check_k", "as_index_tensor", "compute_dtype",
           "dtype_name", "zero_rows_error"]


class RetrievalInputError(UserInputError):
    """Descriptors, rankings or parameters that the retrieval functions cannot work with."""


def _shape(a) -> tuple[int, ...]:
    return tuple(int(s) for s in a.shape)


def dtype_name(a) -> str:
    """``a.dtype`` spelled the same for numpy arrays and torch tensors (``float16``, ``int64``, ...)."""
    return str(a.dtype).replace("torch.", "")


def compute_dtype(*arrays) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 inputs accumulate in fp32)."""
    for a in arrays:
        if a is not None and dtype_name(a) == "float64":
            return torch.float64
    return torch.float32


def zero_rows_error(name: str, count: int, first: list[int]) -> RetrievalInputError:
    """The error for ``count`` all-zero rows of matrix ``name``, the first few at rows ``first``."""
    return RetrievalInputError(
        f"{name} has {count} all-zero row{'s' if count != 1 else ''} (first at row{'s' if len(first) > 1 else ''} "
        f"{', '.join(map(str, first))}): a zero descriptor has no direction, so it scores 0 against everything "
        "and its place in a ranking means nothing. Likely a failed extraction (an unreadable image, or rows of a "
        "pre-allocated file that were never written, as the R1M rows of missing images are: keep only the rows in "
        "R1MDescriptors.valid_indices); extract those rows again or leave them out"
    )


class ZeroRowTally:
    """All-zero rows of a matrix read in chunks: how many, and the first few, for one error at the end."""

    def __init__(self, name: str, shown: int = 5) -> None:
        self.name, self.shown, self.count, self.first = name, shown, 0, []

    def add(self, rows: torch.Tensor, start: int, candidates: torch.Tensor | None = None) -> None:
        """Tally the all-zero rows of ``rows`` (rows ``start``, ``start + 1``, ... of the matrix).

        ``candidates``: local row indices that can be zero (e.g. the columns of a score block that
        are 0 for every query); only those are read, so the check costs nothing when there are none.
        """
        if candidates is None:
            zero = (rows == 0).all(dim=1).nonzero()[:, 0]
        elif candidates.numel():
            zero = candidates[(rows[candidates] == 0).all(dim=1)]
        else:
            return
        if zero.numel():
            self.count += int(zero.numel())
            self.first += [start + int(i) for i in zero[: self.shown - len(self.first)]]

    def check(self) -> None:
        """Raise :func:`zero_rows_error` if any all-zero row was tallied."""
        if self.count:
            raise zero_rows_error(self.name, self.count, self.first)


def check_descriptors(Q, X, *, q_name: str = "Q", x_name: str = "X") -> None:
    """Validate a query matrix (nq, D) and a database matrix (n, D).

    ``Q`` is small and checked here for non-finite values and all-zero rows (a zero descriptor has
    no direction; :func:`zero_rows_error`); ``X`` may be a 1M-row memory map, so the functions
    check it for both in the chunked pass they make over it anyway.
    """
    for name, a in ((q_name, Q), (x_name, X)):
        if not isinstance(a, (torch.Tensor, np.ndarray)):
            raise RetrievalInputError(f"{name} must be a torch tensor or numpy array, got {type(a).__name__}")
        if a.ndim != 2:
            raise RetrievalInputError(f"{name} must be 2-D (rows, dim), got shape {_shape(a)}")
        is_float = a.dtype.is_floating_point if isinstance(a, torch.Tensor) else a.dtype.kind == "f"
        if not is_float:
            raise RetrievalInputError(f"{name} must hold floating-point descriptors, got dtype {dtype_name(a)}")
    if X.shape[0] == 0:
        raise RetrievalInputError(f"empty database: {x_name} has 0 rows")
    if Q.shape[0] == 0:
        raise RetrievalInputError(f"no queries: {q_name} has 0 rows")
    if Q.shape[1] != X.shape[1]:
        raise RetrievalInputError(
            f"descriptor dimensions differ: {q_name} is {_shape(Q)} but {x_name} is {_shape(X)}")
    check_finite(Q, q_name)
    zeros = ZeroRowTally(f"{q_name} (query descriptors)" if q_name == "Q" else q_name)
    zeros.add(torch.as_tensor(Q) if isinstance(Q, np.ndarray) else Q, 0)
    zeros.check()


def check_finite(a, name: str, row_offset: int = 0) -> None:
    """Raise naming the first row (plus ``row_offset``) of a 2-D array holding nan/inf."""
    t = torch.as_tensor(a) if isinstance(a, np.ndarray) else a
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        row = int(bad.any(dim=-1).nonzero()[0, 0])
        raise RetrievalInputError(f"non-finite values (nan/inf) in {name}, first at row {row_offset + row}")


def raise_nonfinite_rows(scores: torch.Tensor, row_offset: int, name: str) -> None:
    """Raise naming the first database row whose scores are not finite (scores: (nq, c))."""
    if bool(torch.isfinite(scores.sum())):  # one cheap reduction; look closer only if it is off
        return
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        col = int(bad.any(dim=0).nonzero()[0, 0])
        raise RetrievalInputError(f"non-finite values (nan/inf) in {name}, first at row {row_offset + col}")


def check_k(k: int, n: int, what: str = "k") -> int:
    """``k`` as an int in [1, n] (n: the database size)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise RetrievalInputError(f"{what} must be an integer, got {k!r}")
    k = int(k)
    if k < 1:
        raise RetrievalInputError(f"{what} must be >= 1, got {k}")
    if k > n:
        raise RetrievalInputError(f"{what}={k} is larger than the database ({n} items)")
    return k


def as_index_tensor(idx, name: str = "idx") -> torch.Tensor:
    """An integer ranking (nq, k) as a LongTensor."""
    t = torch.as_tensor(idx) if isinstance(idx, np.ndarray) else idx
    if not isinstance(t, torch.Tensor):
        raise RetrievalInputError(f"{name} must be a torch tensor or numpy array, got {type(idx).__name__}")
    if t.ndim != 2:
        raise RetrievalInputError(f"{name} must be 2-D (queries, ranked items), got shape {_shape(t)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise RetrievalInputError(f"{name} must hold integer database indices, got dtype {dtype_name(t)}")
    return t.to(dtype=torch.long)
