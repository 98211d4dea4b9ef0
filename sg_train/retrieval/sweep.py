"""A grid of post-processing settings on one set of descriptors: SuperGlobal reranking (M, K, β)
and αQE/αDBA (n, α), every point scored as :func:`~sg_train.retrieval.evaluate_descriptors`
scores one, and the work a parameter does not touch done once for all the points that share it.

A point is applied in this order (each step sees the result of the one before):

1. αDBA on the database (``dba_n`` >= 1): ``X' = alpha_dba(X, dba_n, dba_alpha)``, each database
   vector replaced by the α-weighted sum of its top-n neighbours in X (itself first), L2-normalised;
2. αQE on the queries (``qe_n`` >= 1), from their first ranking against X':
   ``Q' = alpha_qe(Q, X', search(Q, X', qe_n))``, each query plus the α-weighted sum of its top-n;
3. the search of Q' against X', scored exactly (:func:`~sg_train.retrieval.rank_descriptors`);
4. SuperGlobal reranking of its top-M with Q' and X' (``M``, ``K``, ``beta``) when the point reranks.

αQE and αDBA are those of Radenović, Tolias and Chum, "Fine-tuning CNN image retrieval with no
human annotation", TPAMI 2019 (weights ``max(similarity, 0)^α``), as
:mod:`~sg_train.retrieval.query_expansion` computes them (its defaults: n = 2, α = 3). Neither the revisitop benchmark code nor
SuperGlobal's published test code (which reranks the first ranking of the raw descriptors) has
them, so the order above is ours: αDBA is an offline change of the database that every query
then sees, αQE a query-time step, and SuperGlobal reranking refines whatever ranking comes last.

Shared work: X' once per αDBA setting; the first ranking once per αDBA setting (the top
``max(qe_n)`` of its points); Q' once per (αDBA, αQE) setting; the search, its counted tail and
the numbers without reranking once per (αDBA, αQE) setting; per point only the reranking and its
scoring. The first ranking and αDBA's neighbours come from the exact :func:`search` whatever the
backend; a top-n read from a longer top list equals the top-n searched alone, exact score ties aside.
"""
from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from typing import Any

from ._checks import RetrievalInputError
from .evaluation import _pct, rank_descriptors
from .query_expansion import alpha_dba, alpha_qe
from .rerank import _is_int, check_rerank_params
from .search import search
from .tail import check_against_gnd

__all__ = ["SWEEP_PARAMS", "SweepPoint", "best_point", "check_sweep_point", "evaluate_sweep", "format_sweep_table",
           "sweep_points", "sweep_score"]


@dataclass(frozen=True)
class SweepPoint:
    """One setting of the grid, in the order it is applied (module docstring).

    ``dba_n``/``qe_n``: neighbours of αDBA/αQE, integers >= 0, 0 meaning off (then its alpha is
    None); ``dba_alpha``/``qe_alpha``: their similarity exponents, finite >= 0. ``M``, ``K``,
    ``beta``: SuperGlobal reranking (:func:`~sg_train.retrieval.check_rerank_params`), all None
    for a point without reranking.
    """

    dba_n: int = 0
    dba_alpha: float | None = None
    qe_n: int = 0
    qe_alpha: float | None = None
    M: int | None = None
    K: int | None = None
    beta: float | None = None

    @property
    def reranks(self) -> bool:
        return self.M is not None

    def params(self) -> dict[str, Any]:
        """``{field: value}`` in :data:`SWEEP_PARAMS` order, None for what the point does not use."""
        return dict(zip(SWEEP_PARAMS, astuple(self)))


#: the parameter names of a :class:`SweepPoint`, in the order they are applied
SWEEP_PARAMS: tuple[str, ...] = tuple(f.name for f in fields(SweepPoint))


def _expansions(ns: Iterable[int], alphas: Iterable[float]) -> list[tuple[int, float | None]]:
    """The (n, alpha) settings of one expansion; every n = 0 is the one setting "off"."""
    alphas = list(alphas)
    return list(dict.fromkeys((n, None) if n == 0 else (n, a) for n in ns for a in alphas))


def sweep_points(*, rerank: bool, M: Iterable[int] = (400,), K: Iterable[int] = (9,), beta: Iterable[float] = (0.15,),
                 qe_n: Iterable[int] = (0,), qe_alpha: Iterable[float] = (3.0,), dba_n: Iterable[int] = (0,),
                 dba_alpha: Iterable[float] = (3.0,)) -> list[SweepPoint]:
    """Every combination of the values (their product), αDBA settings outermost and reranking
    innermost, so points that share work are adjacent. ``M``, ``K``, ``beta`` are used only with
    ``rerank``; an expansion with n = 0 is off and takes no alpha, so it adds one setting however
    many alphas are given; repeated points are dropped. Values are checked by
    :func:`check_sweep_point`, not here."""
    reranking = list(itertools.product(M, K, beta)) if rerank else [(None, None, None)]
    points = [SweepPoint(d_n, d_a, q_n, q_a, m, k, b)
              for (d_n, d_a), (q_n, q_a), (m, k, b) in itertools.product(
                  _expansions(dba_n, dba_alpha), _expansions(qe_n, qe_alpha), reranking)]
    return list(dict.fromkeys(points))


def check_sweep_point(point: SweepPoint, num_database: int, *, what: str = "the database") -> None:
    """Check one point against a database of ``num_database`` images (named ``what`` in messages).

    αDBA and αQE need an integer n >= 0, at most ``num_database`` (their neighbours come from the
    database), and when on a finite alpha >= 0; reranking is checked by
    :func:`~sg_train.retrieval.check_rerank_params`. Raises :class:`RetrievalInputError` naming the
    parameter, its value and the fix.
    """
    expansions = (("αDBA", point.dba_n, point.dba_alpha, "each database vector's neighbours, itself first"),
                  ("αQE", point.qe_n, point.qe_alpha, "each query's top-ranked neighbours"))
    for name, n, alpha, meaning in expansions:
        if not _is_int(n) or n < 0:
            raise RetrievalInputError(f"{name} n must be an integer >= 0 (0: off; else the number of {meaning} "
                                      f"summed in, e.g. 2), got {n!r}")
        if n == 0:
            continue
        if n > num_database:
            raise RetrievalInputError(f"{name} n={n} is larger than {what} ({num_database} images): lower it to at "
                                      f"most {num_database}")
        if not (isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and math.isfinite(alpha)
                and alpha >= 0):
            raise RetrievalInputError(f"{name} alpha must be a finite number >= 0 (the exponent of the neighbours' "
                                      f"similarity weights, e.g. 3), got {alpha!r}")
    if point.reranks:
        check_rerank_params(num_database, point.M, point.K, point.beta, what=what)


def _groups(indices: Iterable[int], key: Callable[[int], Hashable]) -> list[tuple[Hashable, list[int]]]:
    """``indices`` grouped by ``key``, groups and members in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i in indices:
        groups.setdefault(key(i), []).append(i)
    return list(groups.items())


def evaluate_sweep(Q, X, gnd, points: Sequence[SweepPoint], *, backend: str = "torch", topk: int = 1000,
                   kappas: Sequence[int] = (1, 5, 10), chunk_size: int | None = None, faiss_index: str = "flat",
                   faiss_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every point of ``points`` on query descriptors ``Q`` (nq, D) and database ``X`` (n, D).

    Inputs and search options as :func:`~sg_train.retrieval.evaluate_descriptors` (X may be an
    fp16 ``np.memmap``). Raises :class:`RetrievalInputError`, before any work, for no points, a
    point :func:`check_sweep_point` refuses, or descriptors that do not fit the ground truth. With
    αDBA the augmented database is held in memory as a float32 (n, D) tensor (fp64 for fp64 inputs).

    Returns one dict per point, in order, as ``evaluate_descriptors`` returns for that point on
    the post-processed descriptors: ``"mAP"``, ``"mP"``, with reranking ``"rerank_mAP"`` and
    ``"rerank_mP"`` (values in [0, 1]), and ``"search"``. A point without αQE/αDBA gets exactly
    ``evaluate_descriptors(Q, X, gnd, rerank=..., M=..., K=..., beta=...)``.
    """
    points = list(points)
    if not points:
        raise RetrievalInputError("no sweep points to evaluate")
    entries = check_against_gnd(Q, X, gnd)
    for point in points:
        check_sweep_point(point, int(X.shape[0]))
    ranking = {"backend": backend, "topk": topk, "kappas": kappas, "chunk_size": chunk_size,
               "faiss_index": faiss_index, "faiss_options": faiss_options}
    results: list[dict[str, Any]] = [{} for _ in points]
    for (dba_n, dba_alpha), members in _groups(range(len(points)), lambda i: (points[i].dba_n, points[i].dba_alpha)):
        Xd = alpha_dba(X, dba_n, dba_alpha, chunk_size=chunk_size) if dba_n else X
        qe_ns = [points[i].qe_n for i in members if points[i].qe_n]
        first = search(Q, Xd, max(qe_ns), chunk_size=chunk_size)[0] if qe_ns else None
        for (qe_n, qe_alpha), group in _groups(members, lambda i: (points[i].qe_n, points[i].qe_alpha)):
            Qe = alpha_qe(Q, Xd, first, qe_n, qe_alpha) if qe_n else Q
            reranking = [(p.M, p.K, p.beta) for p in (points[i] for i in group) if p.reranks]
            ranked = rank_descriptors(Qe, Xd, entries, rerank_settings=reranking, **ranking)
            for i in group:
                p = points[i]
                reranked = ranked.rerank(p.M, p.K, p.beta) if p.reranks else {}
                results[i] = {**ranked.scores, **reranked, "search": ranked.search_record}
    return results


def sweep_score(results: Mapping[str, Mapping[str, Any]]) -> float:
    """The score of one point from its ``{dataset: result}``: the mean over the datasets of the
    Medium mAP of the final ranking (``"rerank_mAP"`` when there is one, else ``"mAP"``), in [0, 1].
    Datasets without a Medium positive (NaN) are left out; NaN when every one is."""
    values = [res["rerank_mAP" if "rerank_mAP" in res else "mAP"]["M"] for res in results.values()]
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def best_point(scores: Sequence[float]) -> int | None:
    """Index of the highest score (the first of equal ones), NaN left out; None when all are NaN."""
    valid = [i for i, s in enumerate(scores) if not math.isnan(s)]
    return max(valid, key=lambda i: (scores[i], -i)) if valid else None


def _value(v: Any) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def format_sweep_table(points: Sequence[SweepPoint], results: Mapping[str, Sequence[Mapping[str, Any]]],
                       best: int | None = None) -> str:
    """One block per dataset, one row per point: the parameters that differ between points, then
    E/M/H mAP in % without and (when any point reranks) with reranking; the parameters common to
    every point are listed on the first line, and row ``best`` is marked ``*``, e.g.::

        fixed: dba_n=0 qe_n=0 K=9 beta=0.15
        rsynth            mAP                 rerank mAP
               M        E       M       H       E       M       H
          *  400    84.10   67.20   44.30   88.90   75.10   57.80
             800    84.10   67.20   44.30   88.20   74.90   57.10

    ``results`` maps a dataset to its per-point results (``evaluate_sweep``'s list).
    """
    params = [p.params() for p in points]
    varying = [name for name in SWEEP_PARAMS if len({row[name] for row in params}) > 1]
    fixed = [f"{name}={_value(params[0][name])}" for name in SWEEP_PARAMS
             if name not in varying and params[0][name] is not None]
    keys = ["mAP"] + (["rerank_mAP"] if any(p.reranks for p in points) else [])
    widths = [max(5, len(name), *(len(_value(row[name])) for row in params)) for name in varying]
    lead = 5 + sum(w + 1 for w in widths)
    lines = [f"fixed: {' '.join(fixed)}"] if fixed else []
    for name, rows in results.items():
        lines.append((f"{name:<{lead}}" + "".join(f"{label:<24}" for label in ("mAP", "rerank mAP")[:len(keys)])).rstrip())
        lines.append(" " * 5 + "".join(f"{n:>{w}} " for n, w in zip(varying, widths))
                     + "".join(f"{p:>8}" for _ in keys for p in "EMH"))
        for i, res in enumerate(rows):
            lines.append(f"  {'*' if i == best else ' '}  " + "".join(
                f"{_value(params[i][n]):>{w}} " for n, w in zip(varying, widths))
                + "".join(f" {_pct(res[key][p])}" for key in keys for p in "EMH"))
        lines.append("")
    return "\n".join(lines).rstrip("\n")
