"""Revisited Oxford/Paris mAP and mP@k (the revisitop protocol), vectorised over queries.

Protocol (revisitop ``compute_map``), per query and per protocol E/M/H (``PROTOCOLS``):
positives ("ok") and junk are located in the ranking; each positive's position ``r`` is
reduced by the number of junk items ranked before it; for the j-th positive (0-based)
``p0 = 1 if r == 0 else j / r``, ``p1 = (j + 1) / (r + 1)`` and
``AP = Σ_j (p0 + p1) / (2 · n_ok)`` with ``n_ok`` the length of the query's ok list.
mP@k uses the 1-based reduced positions: ``kq = min(max(pos), k)``, ``P = |pos ≤ kq| / kq``.
Queries without positives are skipped (they count neither in the mean nor in its divisor).

Here all queries are handled at once: the ranked positions that hold a gnd item, as flat
arrays sorted by (query, position) with a category bit mask each; cumulative counts give the
junk before each positive and its index j, ``bincount`` the per-query sums. No per-query or
per-position Python loop.

``revisited_map_topk`` gives the same numbers for a database too large to rank fully (R1M):
only the top-k is ranked; a positive or junk item outside it sits at position
``k + #{items outside the top-k that score higher}``, counted in one chunked pass over the
database (``tail_positions``), never sorting the database.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._checks import RetrievalInputError, as_index_tensor
from .ground_truth import CATEGORIES, PROTOCOLS, GndEntries
from .tail import TailPositions, check_topk, positions_in_topk, tail_positions

__all__ = ["revisited_map", "revisited_map_topk"]

_BITS = {cat: np.uint8(1 << i) for i, cat in enumerate(CATEGORIES)}  # easy 1, hard 2, junk 4


def _check_kappas(kappas: Sequence[int]) -> tuple[int, ...]:
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in kappas):
        raise RetrievalInputError(f"kappas must be positive integers, got {tuple(kappas)!r}")
    return tuple(int(k) for k in kappas)


# Per protocol (rows, PROTOCOLS order): the category bits counted as positives and as junk, and
# which categories (columns, CATEGORIES order) make up the positives list.
_PROTOCOL_NAMES = tuple(PROTOCOLS)
_OK_BITS = np.array([sum(int(_BITS[c]) for c in ok) for ok, _ in PROTOCOLS.values()], dtype=np.uint8)
_JUNK_BITS = np.array([sum(int(_BITS[c]) for c in junk) for _, junk in PROTOCOLS.values()], dtype=np.uint8)
_OK_CATEGORIES = np.array([[c in ok for c in CATEGORIES] for ok, _ in PROTOCOLS.values()], dtype=np.int64)


def _metrics(q: np.ndarray, pos: np.ndarray, bits: np.ndarray, entries: GndEntries,
             kappas: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """E/M/H mAP and mP@k from the ranked positions that hold gnd items.

    ``q``, ``pos`` (0-based position in the ranking) and ``bits`` (categories of the item
    there, ``_BITS``) list every such position, sorted by (q, pos). The three protocols are
    handled together: group ``g = protocol * nq + query``.
    """
    nq, n, n_prot = entries.n_queries, q.shape[0], len(_PROTOCOL_NAMES)
    n_groups = n_prot * nq
    is_junk = (bits[None, :] & _JUNK_BITS[:, None]) != 0                  # (protocol, element)
    junk_before = np.zeros((n_prot, n + 1), dtype=np.int64)                # junk among elements [0, i)
    np.cumsum(is_junk, axis=1, out=junk_before[:, 1:])
    junk_before = junk_before.ravel()
    flat = np.flatnonzero(bits[None, :] & _OK_BITS[:, None])              # positives, by (protocol, e)
    prot = flat // n
    e = flat - prot * n
    oq = q[e]
    group = prot * nq + oq                                                 # sorted
    q_start = np.searchsorted(q, np.arange(nq))                            # first element of each query
    # position with the query's junk ranked before it removed, and j-th positive of its group
    row = prot * (n + 1)
    r = pos[e] - junk_before[row + e] + junk_before[row + q_start[oq]]
    all_g = np.arange(n_groups)
    g_start = np.searchsorted(group, all_g)
    g_end = np.searchsorted(group, all_g, side="right")
    j = np.arange(group.shape[0]) - g_start[group]
    n_ok = (_OK_CATEGORIES @ entries.counts.T).ravel()                      # list length per group
    p0 = (j + (r == 0)) / np.maximum(r, 1)                                # 1 if r == 0 (then j == 0) else j / r
    p1 = (j + 1) / (r + 1)
    nonempty = g_end > g_start
    ap = np.zeros(n_groups)
    if group.size:  # per-group sums over the sorted, contiguous segments
        ap[nonempty] = np.add.reduceat(p0 + p1, g_start[nonempty])
    ap /= 2.0 * np.maximum(n_ok, 1)

    # mP@k on 1-based positions, which rise with j: a group's last positive is its max.
    pos1 = r + 1
    max_pos = np.where(nonempty, pos1[np.maximum(g_end - 1, 0)], 0) if pos1.size else np.zeros(n_groups, int)
    span = int(pos1.max()) + 1 if pos1.size else 1
    keys = group * span + pos1                                             # sorted
    kq = np.minimum(max_pos[None, :], np.array(kappas)[:, None])           # (kappa, group)
    hits = np.searchsorted(keys, all_g * span + kq, side="right") - g_start
    prec = hits / np.maximum(kq, 1)                                        # no ranked positive: 0

    # means over the queries that have positives, per protocol
    valid = (n_ok > 0).reshape(n_prot, nq)
    n_valid = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):                   # a protocol without any: nan
        m_ap = (ap.reshape(n_prot, nq) * valid).sum(axis=1) / n_valid
        m_p = (prec.reshape(len(kappas), n_prot, nq) * valid).sum(axis=2) / n_valid
    return {name: {"mAP": float(m_ap[i]), "mP": {kap: float(m_p[c, i]) for c, kap in enumerate(kappas)},
                   "n_queries": int(n_valid[i])}
            for i, name in enumerate(_PROTOCOL_NAMES)}


def _category_bits(entries: GndEntries, n_items: int) -> np.ndarray:
    """(nq, n_items) uint8: which categories each database item has for each query."""
    table = np.zeros((entries.n_queries, n_items), dtype=np.uint8)
    flat = table.reshape(-1)
    codes = entries.query * n_items + entries.item
    for ci, cat in enumerate(CATEGORIES):
        flat[codes[entries.category == ci]] |= _BITS[cat]
    return table


def _ranks_numpy(ranks, nq: int, name: str = "ranks") -> np.ndarray:
    r = as_index_tensor(ranks, name).cpu().numpy()
    if r.shape[0] != nq:
        raise RetrievalInputError(f"{name} has {r.shape[0]} rows but the ground truth has {nq} queries")
    if r.size and int(r.min()) < 0:
        raise RetrievalInputError(f"{name} holds a negative database index ({int(r.min())})")
    return r


def revisited_map(ranks, gnd, kappas: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, Any]]:
    """mAP and mP@k under the Easy/Medium/Hard protocols for rankings ``ranks`` (nq, n).

    ``ranks[q]`` lists database indices best first (numpy or torch); normally all n items, a
    shorter row is treated as the revisitop code treats it (positives not in it add nothing to
    the AP). ``gnd`` is a ``load_gnd`` dict, its ``"gnd"`` list, or ``GndEntries``.

    Vectorised: a per-query category table over database items, looked up through the rank
    matrix (boolean masks over ranks), then cumulative counts over the marked positions.

    Returns ``{"E": {"mAP": float, "mP": {1: float, 5: float, 10: float}, "n_queries": int},
    "M": ..., "H": ...}``, values in [0, 1]; ``n_queries`` counts the queries with positives
    (a protocol with none has ``mAP`` nan).
    """
    entries = GndEntries.from_gnd(gnd)
    kappas = _check_kappas(kappas)
    r = _ranks_numpy(ranks, entries.n_queries)
    r_max = int(r.max()) if r.size else -1
    if entries.n_images is not None and r_max >= entries.n_images:
        raise RetrievalInputError(
            f"ranks hold database index {r_max}, out of range for imlist of {entries.n_images} images")
    nq, length = r.shape
    n_items = max(r_max + 1, entries.max_item() + 1, 1)
    table = _category_bits(entries, n_items).reshape(-1)
    marks = table[r + (np.arange(nq) * n_items)[:, None]].reshape(-1)   # categories at each position
    at = np.flatnonzero(marks != 0)                                     # sorted by (query, position)
    q = at // max(length, 1)
    # A gnd item listed twice in a row would count twice (as in revisitop): refuse it instead.
    # Clearing the table at the items found must clear exactly one cell per marked position.
    n_marked_items = np.count_nonzero(table)
    found = q * n_items + r.reshape(-1)[at]
    table[found] = 0
    if n_marked_items - np.count_nonzero(table) != at.size:
        codes, counts = np.unique(found, return_counts=True)
        dup = int(codes[np.argmax(counts > 1)])
        raise RetrievalInputError(f"ranks row {dup // n_items} lists database item {dup % n_items} more than once")
    return _metrics(q, at - q * length, marks[at], entries, kappas)


def revisited_map_topk(Q, X, ranks, gnd, kappas: Sequence[int] = (1, 5, 10), *,
                       chunk_size: int | None = None, tail: TailPositions | None = None
                       ) -> dict[str, dict[str, Any]]:
    """``revisited_map`` of the full ranking, given only its top-k (huge databases such as R1M).

    ``ranks`` (nq, k) is the explicitly ranked head (e.g. ``search`` then
    ``superglobal_rerank``); the rest of the ranking is every other item in descending score
    ``q · x`` (ties by ascending index). Positives and junk in the rest are placed by
    ``tail_positions`` (pass ``tail`` to reuse one computed for the same top-k sets, e.g. by
    ``search_with_tail``): counted over the full similarity, never sorted. ``Q`` (nq, D) and ``X``
    (n, D) may be tensors or arrays; X may be an fp16 ``np.memmap``, read in chunks. Equals
    ``revisited_map`` on that full ranking; same result structure.
    """
    entries = GndEntries.from_gnd(gnd)
    kappas = _check_kappas(kappas)
    n = int(X.shape[0])
    r = check_topk(ranks, entries, n)
    if tail is None:
        tail = tail_positions(Q, X, r, entries, chunk_size=chunk_size)
    else:
        tail.check_matches(r, n)
    pos = positions_in_topk(r, entries.query, entries.item, n)
    outside = pos < 0
    if outside.any():
        pos[outside] = tail.lookup(entries.query[outside], entries.item[outside])
    # one element per (query, position): merge the categories of an item listed under several
    span = n + 1
    codes = entries.query * span + pos
    order = np.argsort(codes, kind="stable")
    codes = codes[order]
    bits = np.left_shift(np.uint8(1), entries.category[order].astype(np.uint8))
    if codes.size:
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        bits, codes = np.bitwise_or.reduceat(bits, starts), codes[starts]
    q = codes // span
    return _metrics(q, codes - q * span, bits, entries, kappas)
