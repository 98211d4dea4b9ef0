"""One call from descriptors to the numbers, with and without SuperGlobal reranking: the Revisited
E/M/H mAP against a ground truth (``evaluate_descriptors``) or the labelled-set metrics of
pytorch-metric-learning (``evaluate_labelled``), and the paper-style table. Reused by evaluate.py
and the training-time validation callback."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._checks import RetrievalInputError
from .faiss_search import faiss_search
from .ground_truth import GndEntries
from .labelled_metrics import labelled_retrieval_metrics, required_rank_columns
from .rerank import check_rerank_params, superglobal_rerank
from .revisited_map import revisited_map_topk
from .search import search
from .tail import TailPositions, check_against_gnd, search_with_tail, tail_positions

__all__ = ["RankedDescriptors", "evaluate_descriptors", "evaluate_labelled", "format_results_table",
           "rank_descriptors", "BACKENDS"]

BACKENDS = ("torch", "faiss")


@dataclass(frozen=True)
class RankedDescriptors:
    """The search stage of :func:`evaluate_descriptors`, kept so that many SuperGlobal settings
    rerank one search: ``idx`` (nq, k) LongTensor, the top-k per query, best first; ``tail`` the
    full-ranking positions of the ground-truth items beyond it; ``scores`` ``{"mAP": {E, M, H},
    "mP": {...}}`` of the ranking without reranking (values in [0, 1]); ``search_record`` what
    searched (backend, top-k, recall of approximate FAISS indices). Made by :func:`rank_descriptors`."""

    Q: Any
    X: Any
    entries: GndEntries
    idx: torch.Tensor
    tail: TailPositions
    kappas: tuple[int, ...]
    scores: dict[str, Any]
    search_record: dict[str, Any]

    def rerank(self, M: int, K: int, beta: float) -> dict[str, Any]:
        """``{"rerank_mAP": {E, M, H}, "rerank_mP": {...}}`` after ``superglobal_rerank(M, K, beta)``
        of the top-M, the counted tail shared. Raises :class:`RetrievalInputError` for parameters
        :func:`check_rerank_params` refuses or an M beyond the ranked columns (rank with it)."""
        n = int(self.X.shape[0])
        check_rerank_params(n, M, K, beta)
        if min(M, n) > self.idx.shape[1]:
            raise RetrievalInputError(f"reranking M={M} needs the top {min(M, n)} ranked, but the search kept "
                                      f"{self.idx.shape[1]}: pass M to rank_descriptors(rerank_settings=...)")
        reranked = superglobal_rerank(self.Q, self.X, self.idx, M=M, K=K, beta=beta)
        rr = revisited_map_topk(self.Q, self.X, reranked, self.entries, self.kappas, tail=self.tail)
        return {"rerank_mAP": {p: rr[p]["mAP"] for p in rr}, "rerank_mP": {p: rr[p]["mP"] for p in rr}}


def rank_descriptors(Q, X, gnd, *, rerank_settings: Sequence[tuple[int, int, float]] = (), backend: str = "torch",
                     topk: int = 1000, kappas: Sequence[int] = (1, 5, 10), chunk_size: int | None = None,
                     faiss_index: str = "flat", faiss_options: Mapping[str, Any] | None = None) -> RankedDescriptors:
    """Search ``Q`` (nq, D) against ``X`` (n, D) and score the ranking: the first stage of
    :func:`evaluate_descriptors` (see there for the inputs and the search), without reranking.

    ``rerank_settings``: the ``(M, K, beta)`` that :meth:`RankedDescriptors.rerank` will be asked
    for; each is checked (:func:`check_rerank_params`) before the search, and the search keeps the
    top ``max(topk, M)`` for the largest M (the whole database if smaller).
    """
    entries = check_against_gnd(Q, X, gnd)
    n = int(X.shape[0])
    if backend not in BACKENDS:
        raise RetrievalInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    for M, K, beta in rerank_settings:
        check_rerank_params(n, M, K, beta)
    k = min(n, max([int(topk), 1] + [M for M, _, _ in rerank_settings]))

    info: dict[str, Any] = {"backend": backend, "topk": k}
    if backend == "torch":
        idx, _, tail = search_with_tail(Q, X, k, entries, chunk_size=chunk_size)
    else:
        idx, _, extra = faiss_search(Q, X, k, index=faiss_index, chunk_size=chunk_size, **dict(faiss_options or {}))
        info.update(extra)
        tail = tail_positions(Q, X, idx, entries, chunk_size=chunk_size)
    kappas = tuple(kappas)
    base = revisited_map_topk(Q, X, idx, entries, kappas, tail=tail)
    scores = {"mAP": {p: base[p]["mAP"] for p in base}, "mP": {p: base[p]["mP"] for p in base}}
    return RankedDescriptors(Q, X, entries, idx, tail, kappas, scores, info)


def evaluate_descriptors(Q, X, gnd, *, rerank: bool = True, M: int = 400, K: int = 9, beta: float = 0.15,
                         backend: str = "torch", topk: int = 1000, kappas: Sequence[int] = (1, 5, 10),
                         chunk_size: int | None = None, faiss_index: str = "flat",
                         faiss_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Revisited E/M/H mAP (and mP@k) of query descriptors ``Q`` (nq, D) against ``X`` (n, D).

    Search ranks the top ``max(topk, M)`` items per query (the whole database if smaller);
    positives and junk beyond that are placed exactly by counting over the full similarity
    (``search_with_tail``: the same single pass over X as the search), so the numbers equal those
    of the full ranking for any n, R1M included. With ``rerank`` the top-M is reordered by
    ``superglobal_rerank(M, K, beta)``; both rankings share the counted tail.

    ``gnd``: a ``load_gnd`` dict (its imlist length must equal n), its ``"gnd"`` list, or
    ``GndEntries``. ``backend``: ``"torch"`` (exact, chunked, any device) or ``"faiss"``
    (``faiss_index`` flat / ivf / hnsw, ``faiss_options`` passed to ``faiss_search``; the tail is
    then counted in a second pass). X may be an fp16 ``np.memmap``. Reranking parameters are
    checked (:func:`check_rerank_params`) before the search; all-zero descriptor rows raise.
    The two stages are :func:`rank_descriptors` and :meth:`RankedDescriptors.rerank` (many
    reranking settings on one search: :func:`~sg_train.retrieval.sweep.evaluate_sweep`).

    Returns ``{"mAP": {"E", "M", "H"}, "mP": {"E": {1: .., 5: .., 10: ..}, ...}}`` plus
    ``"rerank_mAP"`` and ``"rerank_mP"`` when reranking, values in [0, 1], and ``"search"``
    (backend, top-k, and for approximate FAISS indices their recall@k against exact search).
    """
    ranked = rank_descriptors(Q, X, gnd, rerank_settings=[(M, K, beta)] if rerank else [], backend=backend,
                              topk=topk, kappas=kappas, chunk_size=chunk_size, faiss_index=faiss_index,
                              faiss_options=faiss_options)
    out = dict(ranked.scores)
    if rerank:
        out.update(ranked.rerank(M, K, beta))
    out["search"] = ranked.search_record
    return out


def _split_self(idx: torch.Tensor, self_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept (nq, k - 1), removed (nq,))``: each row of ``idx`` (nq, k) without the query's own
    gallery index (``self_id``, -1: none); a row that does not hold it gives up its last column."""
    keep = idx != self_id.to(idx.device).unsqueeze(1)
    keep[keep.all(dim=1), -1] = False
    return idx[keep].view(idx.shape[0], idx.shape[1] - 1), idx[~keep]


def evaluate_labelled(Q, X, query_labels, gallery_labels, *, query_gallery_ids=None, ks: Sequence[int] = (1, 5, 10),
                      rerank: bool = True, M: int = 400, K: int = 9, beta: float = 0.15) -> dict[str, Any]:
    """Labelled-set retrieval metrics of ``Q`` (nq, D) against ``X`` (n, D), before and after reranking.

    Relevance is label equality (``query_labels`` (nq,), ``gallery_labels`` (n,), integers).
    ``query_gallery_ids`` (nq,): the gallery row of each query's own image, -1 where it is not in
    the gallery; a query is taken out of its own ranking *before* reranking, so that SuperGlobal's
    neighbourhood never includes the query itself (leave-one-out). The exact search keeps the top
    ``required_rank_columns`` items (MAP@R needs the top R of every query) and at least M when
    reranking; the reranked ranking is scored the same way.

    Returns ``{"metrics": {...}, "rerank_metrics": {...}}`` (the latter with ``rerank``), each
    :func:`~sg_train.retrieval.labelled_metrics.labelled_retrieval_metrics`' dict: precision@1,
    recall@k, mAP@k (pytorch-metric-learning's), MAP@R, R-precision in [0, 1] and
    num_queries_scored. Raises :class:`RetrievalInputError` for bad inputs or when no query has
    a relevant gallery item.
    """
    n = int(X.shape[0])
    ids = None if query_gallery_ids is None else torch.as_tensor(query_gallery_ids, dtype=torch.long)
    in_gallery = ids is not None and bool((ids >= 0).any())
    needed = required_rank_columns(query_labels, gallery_labels, ks, query_gallery_ids=ids)
    if rerank:
        check_rerank_params(n - int(in_gallery), M, K, beta)
        needed = max(needed, M + int(in_gallery))
    idx, _ = search(Q, X, min(n, needed))
    score = {"ks": ks, "query_gallery_ids": ids}
    out = {"metrics": labelled_retrieval_metrics(idx, query_labels, gallery_labels, **score)}
    if rerank:
        if in_gallery:  # rerank without the query itself, then hand it back at the end (the metrics skip it)
            kept, removed = _split_self(idx, ids)
            reranked = torch.cat([superglobal_rerank(Q, X, kept, M=M, K=K, beta=beta), removed.unsqueeze(1)], dim=1)
        else:
            reranked = superglobal_rerank(Q, X, idx, M=M, K=K, beta=beta)
        out["rerank_metrics"] = labelled_retrieval_metrics(reranked, query_labels, gallery_labels, **score)
    return out


def _pct(v: float) -> str:
    return f"{100 * v:7.2f}" if v is not None and not math.isnan(v) else f"{'n/a':>7}"


def format_results_table(results: Mapping[str, Mapping[str, Any]], *,
                         rerank_label: str = "+ SuperGlobal rerank") -> str:
    """The paper's layout: one block per dataset, values in %, without and with reranking.

    ``results`` maps a dataset name to an ``evaluate_descriptors`` result (columns E/M/H mAP) or
    an ``evaluate_labelled`` one (columns: its metrics), e.g.::

        roxford5k                   E       M       H
          global descriptor     84.10   67.20   44.30
          + SuperGlobal rerank  88.90   75.10   57.80
    """
    labels = {"mAP": "global descriptor", "rerank_mAP": rerank_label,
              "metrics": "global descriptor", "rerank_metrics": rerank_label}
    width = 2 + max([len(label) + 2 for label in labels.values()] + [len(name) for name in results])
    blocks = []
    for name, res in results.items():
        if "metrics" in res:
            columns = [c for c in res["metrics"] if c != "num_queries_scored"]
        else:
            columns = list("EMH")
        cell = max(7, *(len(c) for c in columns))
        lines = [f"{name:<{width}}" + " ".join(f"{c:>{cell}}" for c in columns)]
        for key, label in labels.items():
            if key in res:
                lines.append(f"  {label:<{width - 2}}" + " ".join(f"{_pct(res[key].get(c)):>{cell}}" for c in columns))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
