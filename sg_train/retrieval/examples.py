"""What the model retrieves for a few queries: each one's top-k before and after SuperGlobal
reranking, the relevance of every result, and the query's AP. These are the rows of the W&B
example table and of the PNG grids (``sg_train/figures.py``).

The queries are spread evenly over the query list (:func:`select_queries`), so an evaluation
shows the same queries at every epoch and in every run on the benchmark. Only the chosen queries
are ranked, over the whole database: reranking treats each query on its own
(:func:`~sg_train.retrieval.superglobal_rerank`), so their rows equal those of the full
evaluation. Each query's AP is the benchmark's own metric on its full ranking: the revisitop AP
under the E/M/H protocols (:func:`~sg_train.retrieval.revisited_map` on that query), or MAP@R on a
labelled set (:func:`~sg_train.retrieval.labelled_retrieval_metrics`, the query left out of its
own ranking before reranking, as :func:`~sg_train.retrieval.evaluate_labelled` does).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._checks import RetrievalInputError
from .ground_truth import CATEGORIES, PROTOCOLS, GndEntries
from .labelled_metrics import labelled_retrieval_metrics
from .rerank import superglobal_rerank
from .revisited_map import revisited_map
from .search import search

__all__ = ["LABELLED_RELEVANCE", "REVISITED_RELEVANCE", "QueryExample", "labelled_examples", "revisited_examples",
           "select_queries"]

#: the relevance of a result on a Revisited benchmark: its ground-truth category for the query, or "negative"
REVISITED_RELEVANCE = (*CATEGORIES, "negative")
#: ... and on a labelled set: "positive" (the query's class) or "negative"
LABELLED_RELEVANCE = ("positive", "negative")


@dataclass(frozen=True)
class QueryExample:
    """One query's results.

    ``query``: index in the query list. ``ranks``: its top-k database (gallery) indices, best
    first; ``relevance``: one of :data:`REVISITED_RELEVANCE` or :data:`LABELLED_RELEVANCE` per rank; ``ap``: ``{"E", "M", "H"}`` (nan
    where the protocol gives the query no positive) or ``{"MAP@R"}``, in [0, 1]. The ``rerank_``
    fields hold the same after SuperGlobal reranking (None without it).
    """

    query: int
    ranks: tuple[int, ...]
    relevance: tuple[str, ...]
    ap: dict[str, float]
    rerank_ranks: tuple[int, ...] | None = None
    rerank_relevance: tuple[str, ...] | None = None
    rerank_ap: dict[str, float] | None = None


def select_queries(n_queries: int, count: int) -> list[int]:
    """``count`` query indices spread evenly over ``range(n_queries)`` (first and last included;
    all of them when ``count >= n_queries``). Raises ``RetrievalInputError`` for a negative count."""
    if count < 0:
        raise RetrievalInputError(f"the number of example queries must be >= 0, got {count}")
    if count >= n_queries:
        return list(range(n_queries))
    if count == 1:
        return [0]
    return sorted({round(i * (n_queries - 1) / (count - 1)) for i in range(count)})


def _check_k(k: int, n: int) -> None:
    if k < 1:
        raise RetrievalInputError(f"the number of results shown per query must be >= 1, got {k}")
    if n < 1:
        raise RetrievalInputError("the database is empty: there is nothing to show")


def _examples(Q, X, queries: Sequence[int], k: int, full_rank: Callable[[torch.Tensor], torch.Tensor],
              relevance: Callable[[int, int, torch.Tensor], tuple[str, ...]],
              score: Callable[[int, int, torch.Tensor], dict[str, float]],
              rerank: bool, M: int, K: int, beta: float) -> list[QueryExample]:
    """The shared steps: full ranking of the chosen queries, rerank, then per query its top-k,
    relevance and AP. ``full_rank(q)`` (len(queries),) -> rankings (len(queries), m);
    ``relevance(row, query, ranks)`` and ``score(row, query, full ranking)`` per query."""
    chosen = torch.as_tensor(list(queries), dtype=torch.long)
    if chosen.numel() and (chosen.min() < 0 or chosen.max() >= Q.shape[0]):
        raise RetrievalInputError(f"example queries {list(queries)} must lie in [0, {Q.shape[0]})")
    if not chosen.numel():
        return []
    Qs = torch.as_tensor(np.asarray(Q[chosen.numpy()]))
    ranked = full_rank(chosen).cpu()
    reranked = superglobal_rerank(Qs, X, ranked, M=M, K=K, beta=beta).cpu() if rerank else None
    out = []
    for row, q in enumerate(chosen.tolist()):
        top = ranked[row, :k]
        example = {"query": q, "ranks": tuple(top.tolist()), "relevance": relevance(row, q, top),
                   "ap": score(row, q, ranked[row])}
        if reranked is not None:
            rtop = reranked[row, :k]
            example.update(rerank_ranks=tuple(rtop.tolist()), rerank_relevance=relevance(row, q, rtop),
                           rerank_ap=score(row, q, reranked[row]))
        out.append(QueryExample(**example))
    return out


def revisited_examples(Q, X, gnd, queries: Sequence[int], k: int = 5, *, rerank: bool = True, M: int = 400,
                       K: int = 9, beta: float = 0.15) -> list[QueryExample]:
    """Examples of ``queries`` on a Revisited benchmark: query descriptors ``Q`` (nq, D), database
    ``X`` (n, D), ``gnd`` a ``load_gnd`` dict or its ``"gnd"`` list.

    Relevance per result: ``easy``, ``hard``, ``junk`` (the query's ground-truth lists) or
    ``negative``; ``ap`` is the revisitop AP of the query under E, M and H on its full ranking
    (the value :func:`~sg_train.retrieval.evaluate_descriptors` averages). ``k``: results shown
    (at most n). Raises ``RetrievalInputError`` for bad queries, k or descriptors.
    """
    entries = GndEntries.from_gnd(gnd)
    n = int(X.shape[0])
    _check_k(k, n)
    k = min(k, n)
    category = {}  # (query, item) -> category
    for q, item, c in zip(entries.query.tolist(), entries.item.tolist(), entries.category.tolist()):
        category.setdefault((q, item), CATEGORIES[c])
    one_query = {}

    def score(row: int, q: int, ranking: torch.Tensor) -> dict[str, float]:
        if q not in one_query:
            one_query[q] = [{c: entries.item[(entries.query == q) & (entries.category == i)]
                             for i, c in enumerate(CATEGORIES)}]
        result = revisited_map(ranking.unsqueeze(0), one_query[q])
        return {p: result[p]["mAP"] for p in PROTOCOLS}

    return _examples(Q, X, queries, k, lambda chosen: search(Q[chosen.numpy()], X, n)[0],
                     lambda row, q, top: tuple(category.get((q, i), "negative") for i in top.tolist()),
                     score, rerank, M, K, beta)


def labelled_examples(Q, X, query_labels, gallery_labels, queries: Sequence[int], k: int = 5, *,
                      query_gallery_ids=None, rerank: bool = True, M: int = 400, K: int = 9,
                      beta: float = 0.15) -> list[QueryExample]:
    """Examples of ``queries`` on a labelled query/gallery set (arguments as in
    :func:`~sg_train.retrieval.evaluate_labelled`).

    A query's own gallery image (``query_gallery_ids``) is left out of its results. Relevance per
    result: ``positive`` (the query's label) or ``negative``; ``ap`` is ``{"MAP@R": ...}`` on the
    query's full ranking (nan when no other gallery image has its label). Raises
    ``RetrievalInputError`` for bad queries, k, labels or descriptors.
    """
    ql = torch.as_tensor(np.asarray(query_labels), dtype=torch.long)
    gl = torch.as_tensor(np.asarray(gallery_labels), dtype=torch.long)
    ids = (torch.full((ql.numel(),), -1, dtype=torch.long) if query_gallery_ids is None
           else torch.as_tensor(np.asarray(query_gallery_ids), dtype=torch.long))
    n = int(X.shape[0])
    own = int((ids >= 0).any())
    _check_k(k, n - own)
    k = min(k, n - own)

    removed: dict[int, torch.Tensor] = {}  # query -> the gallery index taken out of its row

    def full_rank(chosen: torch.Tensor) -> torch.Tensor:
        ranked, _ = search(Q[chosen.numpy()], X, n)
        ranked = ranked.cpu()
        if not own:
            return ranked
        keep = ranked != ids[chosen].unsqueeze(1)  # the query itself out; a row without it gives up its last
        keep[keep.all(dim=1), -1] = False
        removed.update(zip(chosen.tolist(), ranked[~keep].split(1)))
        return ranked[keep].view(len(chosen), n - 1)

    def score(row: int, q: int, ranking: torch.Tensor) -> dict[str, float]:
        if int((gl == ql[q]).sum()) - int(ids[q] >= 0) == 0:
            return {"MAP@R": float("nan")}
        full = torch.cat([ranking, removed[q]]) if own else ranking  # the metric takes the query out itself
        return {"MAP@R": labelled_retrieval_metrics(full.unsqueeze(0), ql[q : q + 1], gl, ks=(1,),
                                                    query_gallery_ids=ids[q : q + 1])["MAP@R"]}

    return _examples(Q, X, queries, k, full_rank,
                     lambda row, q, top: tuple("positive" if gl[i] == ql[q] else "negative" for i in top.tolist()),
                     score, rerank, M, K, beta)
