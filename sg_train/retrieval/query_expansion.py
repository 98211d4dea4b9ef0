"""α-weighted query expansion (αQE) and database-side augmentation (αDBA), the classic baselines
(Radenović et al., TPAMI 2019): neighbours weighted by ``max(similarity, 0) ** alpha``, summed,
L2-normalised."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import RetrievalInputError, as_index_tensor, check_descriptors, compute_dtype
from ._chunks import take_rows, to_tensor
from .search import pick_device, search

__all__ = ["alpha_qe", "alpha_dba"]


def _check_n_alpha(n: int, alpha: float, limit: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RetrievalInputError(f"n must be a positive integer, got {n!r}")
    if n > limit:
        raise RetrievalInputError(f"n={n} is larger than {what} ({limit})")
    if not alpha >= 0:
        raise RetrievalInputError(f"alpha must be >= 0, got {alpha!r}")


def _weighted_sum(anchor: torch.Tensor, nbrs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Σ_j max(anchor · n_j, 0)^alpha n_j for anchor (b, D), nbrs (b, n, D)."""
    sim = torch.bmm(nbrs, anchor.unsqueeze(2)).squeeze(2).clamp(min=0)
    return torch.bmm((sim ** alpha).unsqueeze(1), nbrs).squeeze(1)


def alpha_qe(Q, X, idx, n: int = 2, alpha: float = 3.0) -> torch.Tensor:
    """αQE: ``q' = normalise(q + Σ_{j<n} max(q · x_j, 0)^alpha x_j)`` over the query's top-n.

    ``idx`` (nq, >= n) is a ranking of X per query (e.g. from ``search``). Returns the new
    queries (nq, D) in the compute dtype (fp32, or fp64 for fp64 inputs); search again with them.
    """
    check_descriptors(Q, X)
    ranks = as_index_tensor(idx, "idx")
    if ranks.shape[0] != Q.shape[0]:
        raise RetrievalInputError(f"idx has {ranks.shape[0]} rows but there are {Q.shape[0]} queries")
    _check_n_alpha(n, alpha, ranks.shape[1], "the number of ranked items in idx")
    device, dtype = pick_device(Q, X, idx), compute_dtype(Q, X)
    q = to_tensor(Q).to(device=device, dtype=dtype)
    nbrs = take_rows(X, ranks[:, :n].to(device), device=device, dtype=dtype)
    return F.normalize(q + _weighted_sum(q, nbrs, alpha), dim=1)


def alpha_dba(X, n: int = 2, alpha: float = 3.0, *, chunk_size: int | None = None,
              row_chunk: int = 4096) -> torch.Tensor:
    """αDBA: every database vector replaced by ``normalise(Σ_{j<n} max(x · x_j, 0)^alpha x_j)``
    over its top-n neighbours in X (itself first, weight 1 for a unit-norm x).

    Rows are processed ``row_chunk`` at a time (each a ``search`` over X), so memory stays
    bounded apart from the (n, D) result; the cost is the n × n similarity. Returns (n, D).
    """
    check_descriptors(X, X, q_name="X", x_name="X")
    n_items = int(X.shape[0])
    _check_n_alpha(n, alpha, n_items, "the database")
    device, dtype = pick_device(X), compute_dtype(X)
    out = torch.empty((n_items, int(X.shape[1])), device=device, dtype=dtype)
    for b0 in range(0, n_items, row_chunk):
        b1 = min(n_items, b0 + row_chunk)
        anchor = to_tensor(X[b0:b1]).to(device=device, dtype=dtype)
        nn_idx, _ = search(anchor, X, n, chunk_size=chunk_size)
        nbrs = take_rows(X, nn_idx, device=device, dtype=dtype)
        out[b0:b1] = F.normalize(_weighted_sum(anchor, nbrs, alpha), dim=1)
    return out
