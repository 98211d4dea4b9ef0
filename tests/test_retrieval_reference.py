"""Slow reference implementations written straight from the protocols (docs/design.md §4), the
oracles the fast library code is tested and benchmarked against, and checks of the references
themselves on hand-computed examples. (Imported by the other retrieval tests and by bench/.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

PROTOCOL_LISTS = {  # as revisitop's example builds them
    "E": (("easy",), ("junk", "hard")),
    "M": (("easy", "hard"), ("junk",)),
    "H": (("hard",), ("junk", "easy")),
}


def ref_compute_ap(ranks, nres):
    """revisitop compute_ap: ranks = 0-based positions of positives with junk removed."""
    ap = 0.0
    recall_step = 1.0 / nres
    for j in range(len(ranks)):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def ref_compute_map(ranks, gnd, kappas=()):
    """revisitop compute_map, one query per row of ``ranks`` (nq, n); np.isin for numpy 2."""
    nq = len(gnd)
    map_sum = 0.0
    pr = np.zeros(len(kappas))
    nempty = 0
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            nempty += 1
            continue
        qgndj = np.array(gnd[i]["junk"])
        row = np.asarray(ranks[i])
        pos = np.arange(row.shape[0])[np.isin(row, qgnd)]
        junk = np.arange(row.shape[0])[np.isin(row, qgndj)]
        k = 0
        ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        map_sum += ref_compute_ap(pos, len(qgnd))
        pos = pos + 1
        for j, kap in enumerate(kappas):
            kq = min(max(pos), kap)
            pr[j] += (pos <= kq).sum() / kq
    nvalid = nq - nempty
    return map_sum / nvalid, pr / nvalid


def ref_revisited_map(ranks, gnd, kappas=(1, 5, 10)):
    """E/M/H with the same result structure as sg_train.retrieval.revisited_map."""
    out = {}
    for name, (ok_keys, junk_keys) in PROTOCOL_LISTS.items():
        g = [{"ok": np.concatenate([np.asarray(q[c], dtype=np.int64) for c in ok_keys]),
              "junk": np.concatenate([np.asarray(q[c], dtype=np.int64) for c in junk_keys])} for q in gnd]
        m, pr = ref_compute_map(ranks, g, kappas)
        out[name] = {"mAP": m, "mP": {k: float(p) for k, p in zip(kappas, pr)}}
    return out


def ref_superglobal_rerank(Q, X, idx, M=400, K=9, beta=0.15):
    """docs/design.md §4, one query and one item at a time (stable sorts: ties keep earlier first)."""
    Q, X, idx = torch.as_tensor(Q), torch.as_tensor(X), torch.as_tensor(idx)
    dt = torch.float64 if torch.float64 in (Q.dtype, X.dtype) else torch.float32
    out = idx.clone()
    m_eff = min(M, idx.shape[1])
    for qi in range(idx.shape[0]):
        q = Q[qi].to(dt)
        T = idx[qi, :m_eff]
        XT = X[T].to(dt)
        gram = XT @ XT.T                                       # 1. s_ij over T
        d = torch.empty_like(XT)
        for i in range(m_eff):                                 # 2. K+1 largest, weights, refined d_i
            nbr = torch.argsort(gram[i], descending=True, stable=True)[: K + 1]
            w = beta * gram[i, nbr]
            w[0] = 1.0
            d[i] = (w[:, None] * XT[nbr]).sum(0) / w.sum()
        a = d @ q                                              # 3. a_i = q . d_i, re-sort
        order = torch.argsort(a, descending=True, stable=True)
        m = d[order[: K + 1]].max(dim=0).values                # 4. max over the first K+1
        final = (a[order] + d[order] @ m) / 2                  # 5. final score, sort
        order2 = torch.argsort(final, descending=True, stable=True)
        out[qi, :m_eff] = T[order][order2]
    return out


def random_gnd(nq, n, rng, *, sizes=((0, 40), (0, 40), (0, 60)), empty_fraction=0.15):
    """A Revisited-format ground truth dict over n images: per query disjoint random easy,
    hard and junk lists (sizes drawn from the given [lo, hi) ranges); a fraction of queries
    get no easy or no hard items (empty-positive queries under E or H), some nothing at all."""
    gnd = []
    for qi in range(nq):
        counts = [int(rng.integers(lo, hi)) for lo, hi in sizes]
        if rng.random() < empty_fraction:
            counts[int(rng.integers(0, 2))] = 0
        if qi == nq - 1:
            counts = [0, 0, counts[2]]
        items = rng.permutation(n)[: sum(counts)]
        easy, hard, junk = np.split(items, np.cumsum(counts)[:2])
        gnd.append({"bbx": [1.0, 2.0, 30.0, 40.0], "easy": easy.tolist(), "hard": hard.tolist(),
                    "junk": junk.tolist()})
    return {"imlist": [f"db{i}" for i in range(n)], "qimlist": [f"q{i}" for i in range(nq)], "gnd": gnd}


def random_unit(rows, dim, rng, dtype=torch.float32):
    x = torch.from_numpy(rng.standard_normal((rows, dim)))
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def clustered_descriptors(gnd, dim, rng, noise=1.0, dtype=torch.float32):
    """Queries and database where each query's easy/hard items lie near it (realistic mAPs)."""
    nq, n = len(gnd["gnd"]), len(gnd["imlist"])
    Q = rng.standard_normal((nq, dim))
    X = rng.standard_normal((n, dim)) * noise
    for qi, g in enumerate(gnd["gnd"]):
        X[g["easy"]] += 1.5 * Q[qi]
        X[g["hard"]] += 0.7 * Q[qi]
        X[g["junk"]] += 0.5 * Q[qi]
    norm = lambda a: torch.nn.functional.normalize(torch.from_numpy(a), dim=1).to(dtype)  # noqa: E731
    return norm(Q), norm(X)


# ---------------------------------------------------------------- the references themselves

def test_ref_compute_ap_hand_example():
    # ranking: P n P J P  -> positive positions 0, 2, 4; one junk before the last -> 0, 2, 3
    ranks = np.array([[10, 11, 12, 13, 14]])
    gnd = [{"ok": [10, 12, 14], "junk": [13]}]
    m, pr = ref_compute_map(ranks, gnd, kappas=(1, 3))
    # (1 + (1/2 + 2/3)/2 + (2/3 + 3/4)/2) / 3 = 55/72
    assert m == pytest.approx(55 / 72, abs=1e-15)
    # 1-based reduced positions 1, 3, 4: P@1 = 1, P@3 = 2/3
    assert pr.tolist() == pytest.approx([1.0, 2 / 3])


def test_ref_compute_map_skips_queries_without_positives():
    ranks = np.array([[0, 1, 2], [2, 1, 0]])
    gnd = [{"ok": [0], "junk": []}, {"ok": [], "junk": [1]}]
    m, _ = ref_compute_map(ranks, gnd)
    assert m == 1.0


def test_ref_rerank_hand_example():
    # q, and three unit vectors at 0°, 60°, 90°; initial order x1, x0, x2 (x1 wrongly first).
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    X = torch.tensor([[1.0, 0.0], [0.5, 0.75 ** 0.5], [0.0, 1.0]], dtype=torch.float64)
    idx = torch.tensor([[1, 0, 2]])
    # M=3, K=1, beta=1: d0 = (x0 + .5 x1)/1.5, d1 = (x1 + .866 x2)/1.866, d2 = (x2 + .866 x1)/1.866;
    # a = (1.25/1.5, .5/1.866, .433/1.866) -> x0 first; final keeps x0, x1, x2.
    out = ref_superglobal_rerank(q, X, idx, M=3, K=1, beta=1.0)
    assert out.tolist() == [[0, 1, 2]]
    s3 = 0.75 ** 0.5
    d = torch.stack([(X[0] + 0.5 * X[1]) / 1.5, (X[1] + s3 * X[2]) / (1 + s3), (X[2] + s3 * X[1]) / (1 + s3)])
    a = d @ q[0]
    m = torch.maximum(d[0], d[1])
    final = (a + d @ m) / 2
    assert torch.argsort(final, descending=True).tolist() == [0, 1, 2]
