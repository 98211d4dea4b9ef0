"""evaluate_labelled: leave-one-out equals evaluating every query against the gallery without it,
before and after SuperGlobal reranking."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sg_train.retrieval import evaluate_labelled, labelled_retrieval_metrics, search, superglobal_rerank


def clustered(n: int, classes: int, dim: int = 16, noise: float = 0.9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, dim, generator=g)
    X = torch.nn.functional.normalize(centres[labels] + noise * torch.randn(n, dim, generator=g), dim=1)
    return X, labels


def one_out(X, labels, q, *, rerank, M, K, beta, ks):
    """Query q against the gallery without q: its metrics, from a gallery that never held it."""
    rest = torch.cat([torch.arange(q), torch.arange(q + 1, len(X))])
    idx, _ = search(X[q:q + 1], X[rest], len(rest))
    if rerank:
        idx = superglobal_rerank(X[q:q + 1], X[rest], idx, M=M, K=K, beta=beta)
    if not bool((labels[rest] == labels[q]).any()):
        return None
    return labelled_retrieval_metrics(idx, labels[q:q + 1], labels[rest], ks)


@pytest.mark.parametrize("rerank", [False, True])
def test_leave_one_out_is_each_query_against_the_gallery_without_it(rerank):
    X, labels = clustered(60, 8)
    labels[0] = 99  # a class of one: not scored
    ks, params = (1, 5), {"M": 12, "K": 3, "beta": 0.15}
    result = evaluate_labelled(X, X, labels, labels, query_gallery_ids=torch.arange(60), ks=ks, rerank=rerank, **params)
    got = result["rerank_metrics" if rerank else "metrics"]
    each = [m for q in range(60) if (m := one_out(X, labels, q, rerank=rerank, ks=ks, **params)) is not None]
    assert got["num_queries_scored"] == len(each) == 59
    for name in ("precision@1", "recall@5", "mAP@5", "MAP@R", "R-precision"):
        assert got[name] == pytest.approx(np.mean([m[name] for m in each]), abs=1e-12), name


def test_separate_queries_and_a_query_of_an_unknown_class():
    X, labels = clustered(40, 5, seed=1)
    Q, q_labels = clustered(6, 5, seed=2)
    q_labels[5] = 42
    result = evaluate_labelled(Q, X, q_labels, labels, ks=(1, 10), M=10, K=2)
    assert result["metrics"]["num_queries_scored"] == result["rerank_metrics"]["num_queries_scored"] == 5
    assert 0 <= result["rerank_metrics"]["MAP@R"] <= 1
