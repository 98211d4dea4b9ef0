"""SuperGlobal reranking (Shao et al., ICCV 2023), vectorised over queries with bounded memory."""
from __future__ import annotations

import math
import numbers

import torch

from ._checks import RetrievalInputError, as_index_tensor, check_descriptors, compute_dtype, zero_rows_error
from ._chunks import take_rows, to_tensor
from .search import pick_device

__all__ = ["check_rerank_params", "superglobal_rerank"]

# Budget for one query chunk's gathered top-M rows.
_RERANK_BLOCK_BYTES = 64 << 20


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_rerank_params(num_database: int, M: int, K: int, beta: float, *, what: str = "the database") -> None:
    """Check SuperGlobal reranking parameters against a database of ``num_database`` images.

    Needs integers ``M >= 1`` and ``K >= 0`` with ``M >= K + 1`` (each item's K neighbours and
    itself come from the top M), at least ``K + 1`` database images, and a finite ``beta >= 0``.
    ``M`` larger than the database is fine: the whole database is reranked. ``what`` names the
    database in the message (e.g. "roxford5k" or a file). Raises :class:`RetrievalInputError`
    naming the values, the sizes and the fix.
    """
    if not _is_int(M) or M < 1:
        raise RetrievalInputError(f"reranking M must be an integer >= 1 (the top-M items reranked; 400 in the "
                                  f"paper), got {M!r}")
    if not _is_int(K) or K < 0:
        raise RetrievalInputError(f"reranking K must be an integer >= 0 (neighbours besides the item itself; 9 in "
                                  f"the paper), got {K!r}")
    if not (isinstance(beta, numbers.Real) and not isinstance(beta, bool) and math.isfinite(beta) and beta >= 0):
        raise RetrievalInputError(f"reranking beta must be a finite number >= 0 (the neighbours' weight; 0.15 in "
                                  f"the paper), got {beta!r}")
    if M < K + 1:
        raise RetrievalInputError(f"reranking M={M} is smaller than K+1={K + 1}: each item's K neighbours and itself "
                                  f"come from the top M; raise M to at least {K + 1} or lower K to at most {M - 1}")
    n = int(num_database)
    if n < K + 1:
        fix = f"lower K to at most {n - 1}" if n >= 1 else "use a database with images"
        raise RetrievalInputError(f"reranking K={K} needs at least {K + 1} database images (K neighbours plus the "
                                  f"item itself); {what} has {n}: {fix}")


def superglobal_rerank(Q, X, idx, M: int = 400, K: int = 9, beta: float = 0.15, *,
                       query_chunk: int | None = None) -> torch.Tensor:
    """Rerank the top-``M`` of an initial ranking as SuperGlobal's published evaluation does.

    For each query q (unit norm) with top-M items T (rows of ``idx``, best first):

    1. Gram ``s_ij = x_i · x_j`` over T.
    2. For each i, its K+1 largest ``s_ij`` (normally i itself first), weights ``1`` for the
       first and ``beta · s_ij`` for the other K; refined ``d_i = Σ_j w_ij x_j / Σ_j w_ij``
       (not renormalised).
    3. ``a_i = q · d_i``; T re-sorted by ``a`` (descending).
    4. ``m`` = element-wise max of ``d`` over the first K+1 of the re-sorted T.
    5. Final score ``(a_i + m · d_i) / 2``; T sorted by it. Items past M keep their order.

    Queries are processed ``query_chunk`` at a time: a batched Gram (``bmm``, the nq·M²·D cost
    that cannot be avoided), ``topk`` on it, and the refined descriptors only through their dot
    products with q and m (no (nq, M, K+1, D) tensor, not even (nq, M, D) of them). Sorts are
    stable, so exact score ties keep the earlier item first. With fewer than M ranked columns,
    what there is gets reranked (M beyond the database size reranks all of it). Parameters are
    checked by :func:`check_rerank_params`; all-zero or non-finite rows of X among the ranked
    items raise :class:`RetrievalInputError`.

    Returns a LongTensor shaped like ``idx`` on the compute device.
    """
    check_descriptors(Q, X)
    ranks = as_index_tensor(idx, "idx")
    nq, ncols = ranks.shape
    n, dim = int(X.shape[0]), int(X.shape[1])
    if nq != Q.shape[0]:
        raise RetrievalInputError(f"idx has {nq} rows but there are {Q.shape[0]} queries")
    check_rerank_params(n, M, K, beta)
    M, K = int(M), int(K)
    m_eff = min(M, ncols)
    if K + 1 > m_eff:
        raise RetrievalInputError(
            f"K+1={K + 1} neighbours cannot be taken from the {m_eff} ranked items per query in idx")
    if int(ranks.min()) < 0 or int(ranks.max()) >= n:
        raise RetrievalInputError(f"idx holds database indices outside [0, {n})")

    device = pick_device(Q, X, idx)
    dtype = compute_dtype(Q, X)
    q_all = to_tensor(Q).to(device=device, dtype=dtype)
    ranks = ranks.to(device)
    top = ranks[:, :m_eff]
    if query_chunk is None:
        query_chunk = max(1, _RERANK_BLOCK_BYTES // (m_eff * dim * dtype.itemsize))
    elif query_chunk < 1:
        raise RetrievalInputError(f"query_chunk must be >= 1, got {query_chunk}")

    out = ranks.clone()
    for b0 in range(0, nq, query_chunk):
        b1 = min(nq, b0 + query_chunk)
        xt = take_rows(X, top[b0:b1], device=device, dtype=dtype)
        out[b0:b1, :m_eff] = _rerank_block(q_all[b0:b1], xt, top[b0:b1], K + 1, beta)
    return out


def _check_rows(gram: torch.Tensor, xt: torch.Tensor, top: torch.Tensor) -> None:
    """A nan/inf or an all-zero row shows on the Gram diagonal (x·x); only then look at the rows."""
    diag = gram.diagonal(dim1=1, dim2=2)
    if bool(torch.isfinite(diag).all()) and bool((diag != 0).all()):
        return
    bad = (~torch.isfinite(xt)).any(dim=2).nonzero()
    if bad.numel():
        row = int(top[int(bad[0, 0]), int(bad[0, 1])])
        raise RetrievalInputError(f"non-finite values (nan/inf) in X (database descriptors), at row {row}")
    zero = top[(xt == 0).all(dim=2)].unique()  # sorted database rows
    if zero.numel():
        raise zero_rows_error("X (database descriptors)", int(zero.numel()), zero[:5].tolist())


def _rerank_block(q: torch.Tensor, xt: torch.Tensor, top: torch.Tensor, k1: int, beta: float) -> torch.Tensor:
    """One chunk of queries: q (b, D), xt = X[top] (b, M, D), top (b, M) -> reranked top (b, M).

    The refined descriptors enter only through dot products, so they are never formed for all
    M items: with w the neighbour weights, ``a_i = q·d_i = Σ_j w_ij (q·x_j) / Σ_j w_ij`` and
    ``m·d_i = Σ_j w_ij (m·x_j) / Σ_j w_ij``; only the K+1 descriptors that ``m`` is the max of
    are built. Beyond the Gram, the work is two (b, M, D) matrix-vector products.
    """
    b, m, dim = xt.shape
    gram = torch.bmm(xt, xt.transpose(1, 2))                       # (b, M, M)
    _check_rows(gram, xt, top)
    w, nbr = gram.topk(k1, dim=2)                                   # K+1 largest, descending
    del gram
    w = w * beta
    w[:, :, 0] = 1.0
    w_sum = w.sum(dim=2)

    def refined_dot(v: torch.Tensor) -> torch.Tensor:               # v (b, D) -> (v · d_i) (b, M)
        xv = torch.bmm(xt, v.unsqueeze(2)).squeeze(2)
        return (w * xv.gather(1, nbr.view(b, m * k1)).view(b, m, k1)).sum(dim=2) / w_sum

    a = refined_dot(q)
    order = a.sort(dim=1, descending=True, stable=True).indices
    first = order[:, :k1]                                           # the K+1 best by a
    nbr_first = nbr.gather(1, first.unsqueeze(2).expand(b, k1, k1))  # their neighbours (b, K+1, K+1)
    x_nbr = xt.gather(1, nbr_first.reshape(b, k1 * k1, 1).expand(b, k1 * k1, dim)).view(b, k1, k1, dim)
    w_first = w.gather(1, first.unsqueeze(2).expand(b, k1, k1))
    d_first = (w_first.unsqueeze(3) * x_nbr).sum(dim=2) / w_sum.gather(1, first).unsqueeze(2)
    mx = d_first.amax(dim=1)                                        # (b, D)
    final = (a + refined_dot(mx)) / 2
    order2 = final.gather(1, order).sort(dim=1, descending=True, stable=True).indices
    return top.gather(1, order).gather(1, order2)
