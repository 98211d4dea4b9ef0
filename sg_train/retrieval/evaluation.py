"""One call from descriptors to the Revisited numbers, with and without SuperGlobal reranking,
and the paper-style table. Reused by evaluate.py and the training-time validation callback."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ._checks import RetrievalInputError
from .faiss_search import faiss_search
from .rerank import check_rerank_params, superglobal_rerank
from .revisited_map import revisited_map_topk
from .tail import check_against_gnd, search_with_tail, tail_positions

__all__ = ["evaluate_descriptors", "format_results_table", "BACKENDS"]

BACKENDS = ("torch", "faiss")


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

    Returns ``{"mAP": {"E", "M", "H"}, "mP": {"E": {1: .., 5: .., 10: ..}, ...}}`` plus
    ``"rerank_mAP"`` and ``"rerank_mP"`` when reranking, values in [0, 1], and ``"search"``
    (backend, top-k, and for approximate FAISS indices their recall@k against exact search).
    """
    entries = check_against_gnd(Q, X, gnd)
    n = int(X.shape[0])
    if backend not in BACKENDS:
        raise RetrievalInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if rerank:
        check_rerank_params(n, M, K, beta)
    k = min(n, max(int(topk), M if rerank else 1))

    info: dict[str, Any] = {"backend": backend, "topk": k}
    if backend == "torch":
        idx, _, tail = search_with_tail(Q, X, k, entries, chunk_size=chunk_size)
    else:
        idx, _, extra = faiss_search(Q, X, k, index=faiss_index, chunk_size=chunk_size, **dict(faiss_options or {}))
        info.update(extra)
        tail = tail_positions(Q, X, idx, entries, chunk_size=chunk_size)
    base = revisited_map_topk(Q, X, idx, entries, kappas, tail=tail)
    out: dict[str, Any] = {"mAP": {p: base[p]["mAP"] for p in base}, "mP": {p: base[p]["mP"] for p in base}}
    if rerank:
        reranked = superglobal_rerank(Q, X, idx, M=M, K=K, beta=beta)
        rr = revisited_map_topk(Q, X, reranked, entries, kappas, tail=tail)
        out["rerank_mAP"] = {p: rr[p]["mAP"] for p in rr}
        out["rerank_mP"] = {p: rr[p]["mP"] for p in rr}
    out["search"] = info
    return out


def _pct(v: float) -> str:
    return f"{100 * v:7.2f}" if v is not None and not math.isnan(v) else f"{'n/a':>7}"


def format_results_table(results: Mapping[str, Mapping[str, Any]], *,
                         rerank_label: str = "+ SuperGlobal rerank") -> str:
    """The paper's layout: one block per dataset, E/M/H mAP in %, without and with reranking.

    ``results`` maps a dataset name to an ``evaluate_descriptors`` result, e.g.::

        roxford5k                   E       M       H
          global descriptor     84.10   67.20   44.30
          + SuperGlobal rerank  88.90   75.10   57.80
    """
    labels = {"mAP": "global descriptor", "rerank_mAP": rerank_label}
    width = 2 + max([len(label) + 2 for label in labels.values()] + [len(name) for name in results])
    blocks = []
    for name, res in results.items():
        lines = [f"{name:<{width}}" + " ".join(f"{p:>7}" for p in "EMH")]
        for key, label in labels.items():
            if key in res:
                lines.append(f"  {label:<{width - 2}}" + " ".join(_pct(res[key].get(p)) for p in "EMH"))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
