"""Retrieval metrics on labelled query/gallery sets (no ground-truth file), as pytorch-metric-learning
defines them: precision@1, recall@k, mAP@k, MAP@R and R-precision.

Relevance comes from class labels: a gallery item is relevant to a query when it has the query's
label. The formulas are those of pytorch-metric-learning (PML) 2.9.0,
``utils/accuracy_calculator.py`` (``precision_at_k``, ``mean_average_precision``,
``mean_average_precision_at_r``, ``r_precision``, ``get_relevance_mask``,
``get_lone_query_labels``) and ``utils/inference.py`` (``return_results``, the self-match
removal); MAP@R is from Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020).

Vectorised with numpy over blocks of queries (bounded memory), no per-query Python loop.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._checks import RetrievalInputError, as_index_tensor, dtype_name

__all__ = ["labelled_metric_names", "labelled_retrieval_metrics", "required_rank_columns"]

# Elements (queries x ranked columns) handled per block: about 30 bytes each in the work arrays.
_BLOCK_ELEMENTS = 1 << 21


def _labels(a, name: str) -> np.ndarray:
    """A 1-D integer label array (numpy or torch, any device) as int64 numpy."""
    if not isinstance(a, (np.ndarray, torch.Tensor)):
        raise RetrievalInputError(f"{name} must be a numpy array or torch tensor, got {type(a).__name__}")
    if a.ndim != 1:
        raise RetrievalInputError(f"{name} must be 1-D (one integer label per image), got shape {tuple(a.shape)}")
    kind_int = (not a.dtype.is_floating_point and not a.dtype.is_complex and a.dtype != torch.bool
                if isinstance(a, torch.Tensor) else a.dtype.kind in "iu")
    if not kind_int:
        raise RetrievalInputError(
            f"{name} must hold integer labels, got dtype {dtype_name(a)}: map class names to integer ids first")
    return (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)).astype(np.int64, copy=False)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    try:
        ks = tuple(ks)
    except TypeError:
        raise RetrievalInputError(f"ks must be a sequence of positive integers, got {ks!r}") from None
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise RetrievalInputError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return tuple(int(k) for k in ks)


@dataclass(frozen=True)
class _Plan:
    """Per query: its gallery index or -1 (``self_id``), R (``relevant``: gallery items with its
    label, itself excluded) and how many columns of ``ranks`` its metrics read (``columns``)."""

    query_labels: np.ndarray
    gallery_labels: np.ndarray
    self_id: np.ndarray
    relevant: np.ndarray
    columns: np.ndarray
    ks: tuple[int, ...]

    @property
    def scored(self) -> np.ndarray:
        return self.relevant > 0


def _plan(query_labels, gallery_labels, ks, query_gallery_ids) -> _Plan:
    ql = _labels(query_labels, "query_labels")
    gl = _labels(gallery_labels, "gallery_labels")
    ks = _check_ks(ks)
    nq, ng = ql.shape[0], gl.shape[0]
    if nq == 0:
        raise RetrievalInputError("no queries: query_labels is empty")
    if ng == 0:
        raise RetrievalInputError("empty gallery: gallery_labels is empty")
    if query_gallery_ids is None:
        self_id = np.full(nq, -1, dtype=np.int64)
    else:
        self_id = _labels(query_gallery_ids, "query_gallery_ids")
        if self_id.shape[0] != nq:
            raise RetrievalInputError(
                f"query_gallery_ids has {self_id.shape[0]} entries but query_labels has {nq}: give each query "
                "its gallery index, or -1 for a query that is not in the gallery")
        bad = np.flatnonzero((self_id < -1) | (self_id >= ng))
        if bad.size:
            raise RetrievalInputError(
                f"query_gallery_ids[{bad[0]}] = {self_id[bad[0]]} is neither -1 (not in the gallery) nor a gallery "
                f"index in [0, {ng})")
        inside = self_id >= 0
        wrong = np.flatnonzero(inside & (gl[np.where(inside, self_id, 0)] != ql))
        if wrong.size:
            q = wrong[0]
            raise RetrievalInputError(
                f"query {q} is said to be gallery item {self_id[q]} (query_gallery_ids), but its label "
                f"{ql[q]} differs from that item's label {gl[self_id[q]]}: the ids or the labels are misaligned")
    in_gallery = (self_id >= 0).astype(np.int64)
    uniq, counts = np.unique(gl, return_counts=True)
    at = np.minimum(np.searchsorted(uniq, ql), uniq.size - 1)
    same_label = np.where(uniq[at] == ql, counts[at], 0)
    relevant = same_label - in_gallery                                       # R, itself excluded
    full = ng - in_gallery                                                  # length of the self-removed ranking
    need = np.minimum(np.maximum(max(ks), relevant), full)
    columns = np.where(relevant > 0, need + in_gallery, 0)                   # + 1 if it may rank itself
    return _Plan(ql, gl, self_id, relevant, columns, ks)


def required_rank_columns(query_labels, gallery_labels, ks: Sequence[int] = (1, 5, 10), *,
                          query_gallery_ids=None) -> int:
    """How many columns ``ranks`` must have for :func:`labelled_retrieval_metrics` to be exact.

    The largest over the scored queries q of ``min(max(max(ks), R_q), n_gallery - s_q) + s_q``: the
    top ``max(ks)`` for recall@k and mAP@k, the top ``R_q`` for MAP@R and R-precision (``R_q``: the
    gallery items sharing q's label, q itself excluded), plus ``s_q = 1`` when q is itself in the
    gallery (its own column is removed); never more than n_gallery. Depends on the labels only, so
    it can size the search (``search(Q, X, k)``) before it runs. Arguments and errors as in :func:`labelled_retrieval_metrics`; returns 0 when
    no query has a relevant gallery item.
    """
    plan = _plan(query_labels, gallery_labels, ks, query_gallery_ids)
    return int(plan.columns.max())


def _block_sums(ranks: np.ndarray, plan: _Plan, rows: slice) -> np.ndarray:
    """Per-metric sums over the queries of ``rows``; columns: precision@1, recall@k (ks), mAP@k (ks),
    MAP@R, R-precision. ``ranks``: (b, C) int64, this block's rows, checked. A query that is not
    scored (R = 0) has no relevant item in its self-removed row, so it adds 0 to every sum."""
    c = ranks.shape[1]
    relevant = plan.relevant[rows]
    rel = plan.gallery_labels[ranks] == plan.query_labels[rows, None]        # (b, C)
    is_self = ranks == plan.self_id[rows, None]                             # -1 never matches
    self_pos = np.where(is_self.any(axis=1), is_self.argmax(axis=1), c)
    col = np.arange(c)
    src = col[None, :] + (col[None, :] >= self_pos[:, None])                 # skip the query's own column
    hit = np.take_along_axis(rel, np.minimum(src, c - 1), axis=1) & (src < c)  # (b, C), itself removed
    n_hits = np.cumsum(hit, axis=1)                                         # Σ_{j≤i} rel_j
    precision = np.where(hit, n_hits / (col + 1.0), 0.0)                    # P@i · rel_i
    ap_sum = np.cumsum(precision, axis=1)
    r_idx = np.maximum(relevant - 1, 0)[:, None]                             # R ≤ ranked columns (planned)
    r_inv = 1.0 / np.maximum(relevant, 1)
    last = [min(k, c) - 1 for k in plan.ks]
    per_query = [hit[:, 0]]
    per_query += [n_hits[:, i] > 0 for i in last]                            # recall@k
    per_query += [ap_sum[:, i] * r_inv for i in last]                        # mAP@k: divided by R, as PML
    per_query += [np.take_along_axis(ap_sum, r_idx, axis=1)[:, 0] * r_inv,   # MAP@R
                  np.take_along_axis(n_hits, r_idx, axis=1)[:, 0] * r_inv]   # R-precision
    return np.array([np.sum(v, dtype=np.float64) for v in per_query])


def labelled_retrieval_metrics(ranks, query_labels, gallery_labels, ks: Sequence[int] = (1, 5, 10), *,
                               query_gallery_ids=None) -> dict[str, float]:
    """precision@1, recall@k, mAP@k, MAP@R and R-precision of rankings over a labelled gallery.

    Inputs (numpy arrays or torch tensors, any device):

    - ``ranks`` (nq, n) integer: row q lists gallery indices best first, the layout
      :func:`~sg_train.retrieval.search` and :func:`~sg_train.retrieval.superglobal_rerank` return
      (one row per query; not revisitop's transposed (n, nq)). ``n`` may be the whole gallery or a
      top-n: it needs at least :func:`required_rank_columns` columns, else
      :class:`RetrievalInputError` (a ``ValueError``) names that number. Only those first columns
      are read (and checked: indices in [0, n_gallery), no index twice in a row).
    - ``query_labels`` (nq,) and ``gallery_labels`` (n_gallery,) integer class labels.
    - ``ks``: the cut-offs of recall@k and mAP@k; a k beyond the gallery means the whole ranking.
    - ``query_gallery_ids`` (nq,) integer, optional: each query's own index in the gallery, or -1
      for a query that is not in it. A query's own index is taken out of its row before scoring
      (PML's ``ref_includes_query=True``), so one set can be both query and gallery
      (leave-one-out: ``query_gallery_ids = arange(n)``). PML also drops the last column of a row
      that lacks the query to keep k columns; here such a row keeps its length (the query then
      ranks below it, so the row is already the top of the self-removed ranking).

    Per query q, with ``R_q`` the gallery items sharing its label (itself excluded), ``rel_i`` in
    {0, 1} whether the item at 1-based position i of its (self-removed) ranking is one of them and
    ``P@i = Σ_{j≤i} rel_j / i``:

    - ``precision@1 = rel_1``;
    - ``recall@k = 1 if Σ_{i≤k} rel_i > 0 else 0`` (so ``recall@1 == precision@1``);
    - ``mAP@k = Σ_{i≤k} P@i · rel_i / R_q``: PML's ``mean_average_precision`` with k neighbours,
      whose divisor is R_q, not min(k, R_q) (Kaggle GLDv2 mAP@100 uses min(R_q, 100)), so it
      stays below 1 when k < R_q; with k ≥ the gallery it is the full-ranking AP;
    - ``MAP@R = Σ_{i≤R_q} P@i · rel_i / R_q`` (PML ``mean_average_precision_at_r``);
    - ``R-precision = Σ_{i≤R_q} rel_i / R_q`` (PML ``r_precision``).

    Each is the plain mean over the scored queries. A query whose label has no other gallery item
    (R_q = 0) is left out of every mean, as PML leaves out its "lone" queries; how many were
    scored is ``num_queries_scored``. Where no query can be scored PML returns nan; here that
    raises :class:`RetrievalInputError` (the query and gallery labels do not overlap).

    Returns ``{"precision@1", "recall@<k>" and "mAP@<k>" for each k, "MAP@R", "R-precision"}``
    as floats in [0, 1], and ``"num_queries_scored"`` (int). Labels are compared for equality
    only; ties in the ranking are the caller's (the order given is the order scored).
    Bad shapes, dtypes or values raise :class:`RetrievalInputError` naming the argument.
    """
    plan = _plan(query_labels, gallery_labels, ks, query_gallery_ids)
    r = as_index_tensor(ranks, "ranks")
    nq, ng = plan.query_labels.shape[0], plan.gallery_labels.shape[0]
    if r.shape[0] != nq:
        hint = (" (it looks transposed: pass it as (queries, ranked items), e.g. ranks.T)"
                if r.shape[1] == nq else "")
        raise RetrievalInputError(f"ranks has {r.shape[0]} rows but query_labels has {nq} queries{hint}")
    if r.shape[1] > ng:
        raise RetrievalInputError(
            f"ranks has {r.shape[1]} columns but gallery_labels only {ng} items: a ranking lists each gallery "
            "item at most once; are gallery_labels those of the searched gallery?")
    n_scored = int(plan.scored.sum())
    if n_scored == 0:
        raise RetrievalInputError(
            f"none of the {nq} queries has a gallery item with its label (besides itself): the metrics are "
            "undefined. Check that query_labels and gallery_labels use the same label ids")
    need = int(plan.columns.max())
    if r.shape[1] < need:
        widest = int(np.argmax(plan.relevant))
        raise RetrievalInputError(
            f"ranks has {r.shape[1]} columns, but the metrics need the top {need} of each query to be exact "
            f"(mAP@k/recall@k read the top max(ks) = {max(plan.ks)}, MAP@R/R-precision the top R, the number of "
            f"gallery items sharing the query's label: up to R = {plan.relevant[widest]} here, for query {widest}; "
            "plus 1 where the query is itself in the gallery): pass rankings with at least "
            f"{need} columns (e.g. search(Q, X, k={need}); see required_rank_columns)")
    sums = np.zeros(3 + 2 * len(plan.ks))
    block = max(1, _BLOCK_ELEMENTS // need)
    for q0 in range(0, nq, block):
        rows = slice(q0, min(q0 + block, nq))
        if not plan.scored[rows].any():
            continue
        part = r[rows, :need].cpu().numpy()
        _check_block(part, ng, q0)
        sums += _block_sums(part, plan, rows)
    values = (sums / n_scored).tolist()
    return {**dict(zip(labelled_metric_names(plan.ks), values)), "num_queries_scored": n_scored}


def labelled_metric_names(ks: Sequence[int]) -> list[str]:
    """The metrics :func:`labelled_retrieval_metrics` returns for ``ks``, in its order (without
    ``num_queries_scored``): ``precision@1``, ``recall@k`` and ``mAP@k`` per k, ``MAP@R``, ``R-precision``."""
    return ["precision@1"] + [f"recall@{k}" for k in ks] + [f"mAP@{k}" for k in ks] + ["MAP@R", "R-precision"]


def _check_block(part: np.ndarray, n_gallery: int, q0: int) -> None:
    """Indices in [0, n_gallery) and none twice in a row, naming the first bad query."""
    bad = (part < 0) | (part >= n_gallery)
    if bad.any():
        q, i = np.argwhere(bad)[0]
        raise RetrievalInputError(
            f"ranks[{q0 + q}, {i}] = {part[q, i]} is not a gallery index in [0, {n_gallery})")
    ordered = np.sort(part, axis=1)
    twice = ordered[:, 1:] == ordered[:, :-1]
    if twice.any():
        q, i = np.argwhere(twice)[0]
        raise RetrievalInputError(
            f"ranks row {q0 + q} lists gallery item {ordered[q, i]} more than once: a ranking lists each item once")
