"""Exact inner-product top-k search over a database read in chunks (bounded memory)."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ._checks import ZeroRowTally, check_descriptors, check_k, compute_dtype, raise_nonfinite_rows
from ._chunks import auto_chunk_rows, iter_row_chunks, to_tensor

__all__ = ["search", "score_chunks", "RunningTopK", "pick_device"]

# Score blocks (query rows x database rows) are kept under this many bytes.
_SCORE_BLOCK_BYTES = 256 << 20
# Database rows read per chunk: this many bytes in the compute dtype.
_CHUNK_BYTES = 128 << 20


def pick_device(*arrays) -> torch.device:
    """The device to compute on: that of the first tensor that is not on the CPU, else the CPU."""
    for a in arrays:
        if isinstance(a, torch.Tensor) and a.device.type != "cpu":
            return a.device
    return torch.device("cpu")


def score_chunks(Q, X, *, chunk_size: int | None = None, query_block: int | None = None
                 ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(q0, start, s)``: scores ``s = Q[q0:q0+b] @ X[start:start+c].T`` as a contiguous
    (b, c) block, over database chunks (outer) and query blocks (inner), each database row read
    once. Non-finite scores raise, naming the database row; all-zero database rows raise once the
    pass is over, naming how many and the first ones (only the columns scoring 0 for every query
    are read again to tell). Inputs are assumed checked."""
    n, dim = int(X.shape[0]), int(X.shape[1])
    device = pick_device(Q, X)
    dtype = compute_dtype(Q, X)
    q = to_tensor(Q).to(device=device, dtype=dtype)
    nq = q.shape[0]
    rows_per_chunk = chunk_size or auto_chunk_rows(dim, budget_bytes=_CHUNK_BYTES, itemsize=dtype.itemsize)
    if rows_per_chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if query_block is None:
        query_block = max(1, _SCORE_BLOCK_BYTES // (min(rows_per_chunk, n) * dtype.itemsize))
    zeros = ZeroRowTally("X (database descriptors)")
    for start, rows in iter_row_chunks(X, rows_per_chunk, device=device, dtype=dtype):
        for q0 in range(0, nq, query_block):
            # (c, D) @ (D, b) is the fast GEMM layout for a thin query block.
            s = (rows @ q[q0:q0 + query_block].T).T.contiguous()
            raise_nonfinite_rows(s, start, "X (database descriptors)")
            if q0 == 0:  # a zero row scores 0 for every query: only such columns can be one
                zeros.add(rows, start, (s == 0).all(dim=0).nonzero()[:, 0])
            yield q0, start, s
    zeros.check()


class RunningTopK:
    """The best ``k`` (score, index) per query seen so far, merged one score block at a time."""

    def __init__(self, nq: int, k: int, device: torch.device, dtype: torch.dtype):
        self.k = k
        self.scores = torch.full((nq, k), float("-inf"), device=device, dtype=dtype)
        self.index = torch.full((nq, k), -1, device=device, dtype=torch.long)
        self.filled = torch.zeros(nq, dtype=torch.long)  # real candidates per query so far

    def push(self, q0: int, start: int, s: torch.Tensor) -> None:
        """Merge scores ``s`` (b, c) of database rows ``start..start+c-1`` for queries ``q0..``."""
        b, c = s.shape
        cs, ci = s.topk(min(self.k, c), dim=1)
        ci += start
        filled = int(self.filled[q0])
        if filled:
            cs = torch.cat([self.scores[q0:q0 + b, :filled], cs], dim=1)
            ci = torch.cat([self.index[q0:q0 + b, :filled], ci], dim=1)
            cs, pos = cs.topk(min(self.k, cs.shape[1]), dim=1)
            ci = ci.gather(1, pos)
        self.scores[q0:q0 + b, : cs.shape[1]] = cs
        self.index[q0:q0 + b, : ci.shape[1]] = ci
        self.filled[q0:q0 + b] = cs.shape[1]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.index, self.scores


def search(Q, X, k: int, *, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` database items for each query by inner product, best first.

    ``s_qj = q · x_j``. The database ``X`` (n, D) is read ``chunk_size`` rows at a time (a torch
    tensor on any device, a numpy array, or a disk-backed ``np.memmap``; fp16/bf16 allowed,
    accumulated in fp32, fp64 inputs in fp64) and a running top-k is merged chunk by chunk, so
    memory is O(nq·(k + chunk_size) + chunk_size·D), never the full n × nq score or rank matrix.

    Returns ``(idx, scores)``: a LongTensor (nq, k) of database indices and their scores (nq, k),
    sorted by descending score, on the compute device (a GPU if ``Q`` or ``X`` lives on one).
    Order among exactly equal scores is unspecified.
    """
    check_descriptors(Q, X)
    k = check_k(k, int(X.shape[0]))
    top = RunningTopK(int(Q.shape[0]), k, pick_device(Q, X), compute_dtype(Q, X))
    for q0, start, s in score_chunks(Q, X, chunk_size=chunk_size):
        top.push(q0, start, s)
    return top.result()
