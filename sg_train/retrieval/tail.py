"""Exact positions of ground-truth items beyond an explicitly ranked top-k (huge databases).

The full ranking is the top-k list (any order, e.g. reranked) followed by every other database
item by descending score ``s = q · x``, equal scores by ascending index. A gnd item g of query q
outside the top-k therefore sits at

    position = k + #{j outside the top-k : s_qj > s_qg  or  (s_qj == s_qg and j < g)}.

The counts come from one chunked pass over the database: each score block is bucketed with
``searchsorted`` against the query's sorted gnd scores, the buckets histogrammed, and the top-k's
own contributions subtracted at the end. Nothing of size n × nq is stored or sorted. A gnd item's
score is computed once (gathered) and used for its own column too, so it never counts itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._checks import RetrievalInputError, as_index_tensor, check_descriptors, check_k, compute_dtype
from ._chunks import take_rows, to_tensor
from .ground_truth import GndEntries
from .search import RunningTopK, pick_device, score_chunks

__all__ = ["TailPositions", "tail_positions", "search_with_tail", "positions_in_topk", "check_topk",
           "check_against_gnd"]


def check_topk(ranks, entries: GndEntries, n: int, name: str = "ranks") -> np.ndarray:
    """A top-k ranking (nq, k) as int64 numpy, checked against the ground truth and n."""
    r = as_index_tensor(ranks, name).cpu().numpy()
    if r.shape[0] != entries.n_queries:
        raise RetrievalInputError(f"{name} has {r.shape[0]} rows but the ground truth has {entries.n_queries} queries")
    if r.shape[1] == 0 or r.shape[1] > n:
        raise RetrievalInputError(f"{name} must have between 1 and n={n} columns, got {r.shape[1]}")
    if int(r.min()) < 0 or int(r.max()) >= n:
        raise RetrievalInputError(f"{name} holds database indices outside [0, {n})")
    if entries.max_item() >= n:
        raise RetrievalInputError(f"ground-truth index {entries.max_item()} is out of range for {n} database items")
    return r


def positions_in_topk(ranks: np.ndarray, query: np.ndarray, item: np.ndarray, n: int) -> np.ndarray:
    """0-based position of each (query, item) in the query's top-k row, -1 where not in it."""
    nq, k = ranks.shape
    codes = (np.arange(nq)[:, None] * n + ranks).ravel()
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    dup = np.flatnonzero(sorted_codes[1:] == sorted_codes[:-1])
    if dup.size:
        c = int(sorted_codes[dup[0]])
        raise RetrievalInputError(f"ranking row {c // n} lists database item {c % n} more than once")
    wanted = query * n + item
    loc = np.minimum(np.searchsorted(sorted_codes, wanted), sorted_codes.shape[0] - 1)
    return np.where(sorted_codes[loc] == wanted, order[loc] % k, -1)


@dataclass(frozen=True)
class TailPositions:
    """Full-ranking positions of the gnd items outside each query's top-k.

    ``codes`` are sorted keys ``query * n + item``, ``positions`` their 0-based positions. Valid
    for every ranking with the same top-k set per query (before and after reranking).
    """

    n: int
    k: int
    topk_sorted: np.ndarray
    codes: np.ndarray
    positions: np.ndarray

    def check_matches(self, ranks: np.ndarray, n: int) -> None:
        if n != self.n or ranks.shape[1] != self.k or not np.array_equal(np.sort(ranks, axis=1), self.topk_sorted):
            raise RetrievalInputError("tail positions were computed for a different database or top-k set")

    def lookup(self, query: np.ndarray, item: np.ndarray) -> np.ndarray:
        wanted = query * self.n + item
        loc = np.minimum(np.searchsorted(self.codes, wanted), max(self.codes.shape[0] - 1, 0))
        if self.codes.size == 0 or not np.array_equal(self.codes[loc], wanted):
            raise RetrievalInputError("tail positions lack a ground-truth item outside the top-k")
        return self.positions[loc]


class _GndScoreCounter:
    """For (query, gnd item) pairs: how many database items score above the item (ties: lower
    index first), accumulated over score blocks."""

    def __init__(self, q_all: torch.Tensor, X, pair_q: np.ndarray, pair_item: np.ndarray):
        device, dtype = q_all.device, q_all.dtype
        nq = q_all.shape[0]
        self.nq = nq
        pq = torch.from_numpy(pair_q).to(device)
        items, which = np.unique(pair_item, return_inverse=True)  # each gnd row read once
        item_scores = q_all @ take_rows(X, torch.from_numpy(items), device=device, dtype=dtype).T
        t = item_scores[pq, torch.from_numpy(which.reshape(-1)).to(device)]
        per_q = np.bincount(pair_q, minlength=nq)
        self.width = width = max(1, int(per_q.max()) if per_q.size else 1)
        self.first = np.concatenate([[0], np.cumsum(per_q)[:-1]])
        slot = torch.from_numpy(np.arange(pair_q.shape[0]) - self.first[pair_q]).to(device)
        thr = torch.full((nq, width), float("inf"), device=device, dtype=dtype)  # padding sorts last
        thr[pq, slot] = t
        self.thr, self.perm = thr.sort(dim=1)                  # ascending; perm: sorted -> original slot
        self.thr = self.thr.contiguous()
        item = torch.full((nq, width), -1, device=device, dtype=torch.long)
        item[pq, slot] = torch.from_numpy(pair_item).to(device)
        self.item = item.gather(1, self.perm)                  # item of each sorted threshold, -1: padding
        self.hist = torch.zeros(nq * (width + 1), device=device, dtype=torch.long)
        self.ties = torch.zeros((nq, width), device=device, dtype=torch.long)
        self.row_offsets = (torch.arange(nq, device=device) * (width + 1)).unsqueeze(1)

    def substitute(self, q0: int, start: int, s: torch.Tensor) -> None:
        """Give each gnd item in this block its gathered score, so it never outranks itself."""
        b, c = s.shape
        item = self.item[q0:q0 + b]
        sel = (item >= start) & (item < start + c)
        if bool(sel.any()):
            qi, si = sel.nonzero(as_tuple=True)
            s[qi, item[qi, si] - start] = self.thr[q0 + qi, si]

    def count(self, q0: int, s: torch.Tensor, ids: torch.Tensor | int, sign: int = 1) -> None:
        """Add (sign=-1: remove) items with scores ``s`` (b, c) for queries ``q0..``; their
        database indices are ``ids + column`` (an int) or ``ids`` (b, c)."""
        b, c = s.shape
        thr = self.thr[q0:q0 + b]
        bucket = torch.searchsorted(thr, s)                    # number of thresholds below the score
        counts = torch.bincount((bucket + self.row_offsets[:b]).view(-1), minlength=b * (self.width + 1))
        hist = self.hist.view(self.nq, self.width + 1)[q0:q0 + b]
        hist += sign * counts.view(b, self.width + 1)
        equal = (bucket < self.width) & (thr.gather(1, bucket.clamp(max=self.width - 1)) == s)
        if bool(equal.any()):                                  # exact ties: the lower index ranks first
            qi, ci = equal.nonzero(as_tuple=True)
            lo = bucket[qi, ci]
            hi = torch.searchsorted(thr[qi], s[qi, ci].unsqueeze(1), right=True).squeeze(1)
            j = ci + ids if isinstance(ids, int) else ids[qi, ci]
            for off in range(int((hi - lo).max())):
                at = lo + off
                hit = (at < hi) & (self.item[q0 + qi, at.clamp(max=self.width - 1)] > j)
                self.ties.index_put_((q0 + qi[hit], at[hit]), torch.full_like(at[hit], sign), accumulate=True)

    def above(self, pair_q: np.ndarray) -> np.ndarray:
        """Per pair (in the order given at construction): the count of items ranked before it."""
        hist = self.hist.view(self.nq, self.width + 1)
        above = hist.flip(1).cumsum(1).flip(1)[:, 1:] + self.ties  # per sorted threshold
        above, perm, valid = above.cpu().numpy(), self.perm.cpu().numpy(), self.item.cpu().numpy() >= 0
        out = np.empty(pair_q.shape[0], dtype=np.int64)
        rows = np.nonzero(valid)[0]
        out[self.first[rows] + perm[valid]] = above[valid]
        return out


def _finish(counter: _GndScoreCounter, codes: np.ndarray, n: int, r: np.ndarray,
            topk_scores: torch.Tensor) -> TailPositions:
    """Remove the top-k's own contributions, keep the pairs outside the top-k."""
    counter.count(0, topk_scores.contiguous(), torch.from_numpy(r).to(topk_scores.device), sign=-1)
    pair_q = codes // n
    k = r.shape[1]
    return TailPositions(n, k, np.sort(r, axis=1), codes, k + counter.above(pair_q))


def check_against_gnd(Q, X, gnd) -> GndEntries:
    """Descriptors checked, and their counts against the ground truth: one query row per gnd
    entry, every gnd index a database row. Returns the flattened ground truth."""
    check_descriptors(Q, X)
    entries = GndEntries.from_gnd(gnd)
    n = int(X.shape[0])
    if Q.shape[0] != entries.n_queries:
        raise RetrievalInputError(
            f"{Q.shape[0]} query descriptors but the ground truth has {entries.n_queries} queries")
    if entries.n_images is not None and entries.n_images != n:
        raise RetrievalInputError(f"{n} database descriptors but the ground truth lists {entries.n_images} images")
    if entries.max_item() >= n:
        raise RetrievalInputError(f"ground-truth index {entries.max_item()} is out of range for {n} database items")
    return entries


def _prepare(Q, X, gnd):
    entries = check_against_gnd(Q, X, gnd)
    device, dtype = pick_device(Q, X), compute_dtype(Q, X)
    return entries, device, dtype, to_tensor(Q).to(device=device, dtype=dtype)


def tail_positions(Q, X, ranks, gnd, *, chunk_size: int | None = None) -> TailPositions:
    """Full-ranking positions of the positives/junk that ``ranks`` (nq, k) leaves out, counted in
    one chunked pass over ``X`` (a tensor, array or fp16 ``np.memmap``); no pass when none is
    left out. See the module docstring for the ranking this defines."""
    entries, device, dtype, q_all = _prepare(Q, X, gnd)
    n = int(X.shape[0])
    r = check_topk(ranks, entries, n)
    inside = positions_in_topk(r, entries.query, entries.item, n) >= 0
    codes = np.unique(entries.query[~inside] * n + entries.item[~inside])
    if codes.size == 0:
        return TailPositions(n, r.shape[1], np.sort(r, axis=1), codes, np.zeros(0, np.int64))
    pair_q = codes // n
    counter = _GndScoreCounter(q_all, X, pair_q, codes - pair_q * n)
    top_t = torch.from_numpy(r).to(device)
    topk_scores = torch.empty(r.shape, device=device, dtype=dtype)
    for q0, start, s in score_chunks(q_all, X, chunk_size=chunk_size, query_block=q_all.shape[0]):
        counter.substitute(q0, start, s)
        counter.count(q0, s, start)
        sel = (top_t >= start) & (top_t < start + s.shape[1])  # record the top-k's scores as counted
        qi, ci = sel.nonzero(as_tuple=True)
        topk_scores[qi, ci] = s[qi, top_t[qi, ci] - start]
    return _finish(counter, codes, n, r, topk_scores)


def search_with_tail(Q, X, k: int, gnd, *, chunk_size: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, TailPositions]:
    """``search(Q, X, k)`` and ``tail_positions`` for its top-k in a single pass over X.

    All gnd items' ranks are counted while the top-k is found; afterwards the top-k's own
    contributions are subtracted. (A gnd item's score is its gathered ``q · x``, also as returned.)
    """
    entries, device, dtype, q_all = _prepare(Q, X, gnd)
    n = int(X.shape[0])
    k = check_k(k, n)
    codes = np.unique(entries.query * n + entries.item)
    pair_q = codes // n
    counter = _GndScoreCounter(q_all, X, pair_q, codes - pair_q * n) if codes.size else None
    top = RunningTopK(q_all.shape[0], k, device, dtype)
    for q0, start, s in score_chunks(q_all, X, chunk_size=chunk_size, query_block=q_all.shape[0]):
        if counter is not None:
            counter.substitute(q0, start, s)
            counter.count(q0, s, start)
        top.push(q0, start, s)
    idx, scores = top.result()
    r = idx.cpu().numpy()
    if counter is None:
        return idx, scores, TailPositions(n, k, np.sort(r, axis=1), codes, np.zeros(0, np.int64))
    full = _finish(counter, codes, n, r, scores)
    outside = positions_in_topk(r, pair_q, codes - pair_q * n, n) < 0
    return idx, scores, TailPositions(n, k, full.topk_sorted, codes[outside], full.positions[outside])
