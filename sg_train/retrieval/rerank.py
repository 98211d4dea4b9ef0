"""SuperGlobal reranking (Shao et al., ICCV 2023), vectorised over queries with bounded memory."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import RetrievalInputError, as_index_tensor, check_descriptors, compute_dtype
from ._chunks import take_rows, to_tensor
from .search import pick_device

__all__ = ["superglobal_rerank"]

# Budget for one query chunk's gathered top-M rows and refined descriptors.
_RERANK_BLOCK_BYTES = 256 << 20


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
    that cannot be avoided), ``topk`` on it, and the neighbour sums as one weighted
    ``embedding_bag`` (no (nq, M, K+1, D) tensor). Sorts are stable, so exact score ties keep
    the earlier item first. With fewer than M ranked columns, what there is gets reranked.

    Returns a LongTensor shaped like ``idx`` on the compute device.
    """
    check_descriptors(Q, X)
    ranks = as_index_tensor(idx, "idx")
    nq, ncols = ranks.shape
    n, dim = int(X.shape[0]), int(X.shape[1])
    if nq != Q.shape[0]:
        raise RetrievalInputError(f"idx has {nq} rows but there are {Q.shape[0]} queries")
    if isinstance(M, bool) or not isinstance(M, int) or M < 1:
        raise RetrievalInputError(f"M must be a positive integer, got {M!r}")
    if isinstance(K, bool) or not isinstance(K, int) or K < 0:
        raise RetrievalInputError(f"K must be a non-negative integer, got {K!r}")
    if K + 1 > M:
        raise RetrievalInputError(f"K+1={K + 1} neighbours cannot be taken from the top M={M}")
    m_eff = min(M, ncols)
    if K + 1 > m_eff:
        raise RetrievalInputError(
            f"K+1={K + 1} neighbours cannot be taken from the {m_eff} ranked items per query in idx")
    if ncols and (int(ranks.min()) < 0 or int(ranks.max()) >= n):
        raise RetrievalInputError(f"idx holds database indices outside [0, {n})")

    device = pick_device(Q, X, idx)
    dtype = compute_dtype(Q, X)
    q_all = to_tensor(Q).to(device=device, dtype=dtype)
    ranks = ranks.to(device)
    top = ranks[:, :m_eff]
    if query_chunk is None:
        query_chunk = max(1, _RERANK_BLOCK_BYTES // (2 * m_eff * dim * dtype.itemsize))

    out = ranks.clone()
    for b0 in range(0, nq, query_chunk):
        b1 = min(nq, b0 + query_chunk)
        out[b0:b1, :m_eff] = _rerank_block(q_all[b0:b1], take_rows(X, top[b0:b1], device=device, dtype=dtype),
                                           top[b0:b1], K + 1, beta)
    return out


def _rerank_block(q: torch.Tensor, xt: torch.Tensor, top: torch.Tensor, k1: int, beta: float) -> torch.Tensor:
    """One chunk of queries: q (b, D), xt = X[top] (b, M, D), top (b, M) -> reranked top (b, M)."""
    b, m, dim = xt.shape
    gram = torch.bmm(xt, xt.transpose(1, 2))                       # (b, M, M)
    w, nbr = gram.topk(k1, dim=2)                                   # K+1 largest, descending
    del gram
    w = w * beta
    w[:, :, 0] = 1.0
    # d_i = Σ_j w_ij x_j / Σ_j w_ij as one fused gather-and-weighted-sum over the flattened rows.
    flat_nbr = (nbr + (torch.arange(b, device=nbr.device) * m).view(b, 1, 1)).view(b * m, k1)
    d = F.embedding_bag(flat_nbr, xt.reshape(b * m, dim), per_sample_weights=w.reshape(b * m, k1),
                        mode="sum").view(b, m, dim)
    d /= w.sum(dim=2, keepdim=True)
    a = torch.bmm(d, q.unsqueeze(2)).squeeze(2)                     # (b, M)
    a, order = a.sort(dim=1, descending=True, stable=True)
    d_sorted_top = d.gather(1, order[:, :k1, None].expand(b, k1, dim))
    mx = d_sorted_top.amax(dim=1)                                   # (b, D)
    md = torch.bmm(d, mx.unsqueeze(2)).squeeze(2).gather(1, order)  # m · d_i in re-sorted order
    final = (a + md) / 2
    order2 = final.sort(dim=1, descending=True, stable=True).indices
    return top.gather(1, order).gather(1, order2)
