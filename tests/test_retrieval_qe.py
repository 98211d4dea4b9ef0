"""αQE and αDBA against their formulas written out per item."""
import numpy as np
import pytest
import torch
from test_retrieval_reference import random_unit

from sg_train.retrieval import RetrievalInputError, alpha_dba, alpha_qe, search


def test_alpha_qe_formula():
    rng = np.random.default_rng(0)
    Q, X = random_unit(4, 16, rng, torch.float64), random_unit(50, 16, rng, torch.float64)
    idx, _ = search(Q, X, 10)
    out = alpha_qe(Q, X, idx, n=3, alpha=3.0)
    for qi in range(4):
        acc = Q[qi].clone()
        for j in idx[qi, :3]:
            acc += max(float(Q[qi] @ X[j]), 0.0) ** 3 * X[j]
        torch.testing.assert_close(out[qi], acc / acc.norm())
    assert torch.allclose(out.norm(dim=1), torch.ones(4, dtype=torch.float64))


def test_alpha_dba_formula_and_chunks():
    rng = np.random.default_rng(1)
    X = random_unit(40, 8, rng, torch.float64)
    out = alpha_dba(X, n=4, alpha=3.0, row_chunk=7, chunk_size=9)
    S = X @ X.T
    for i in range(40):
        nbr = torch.argsort(S[i], descending=True)[:4]
        assert int(nbr[0]) == i  # itself first
        acc = sum(S[i, j].clamp(min=0) ** 3 * X[j] for j in nbr)
        torch.testing.assert_close(out[i], acc / acc.norm())


def test_qe_improves_a_clustered_query_and_errors():
    rng = np.random.default_rng(2)
    X = random_unit(30, 8, rng)
    Q = X[:2] + 0.01 * random_unit(2, 8, rng)
    idx, _ = search(Q, X, 5)
    assert alpha_qe(Q, X, idx, n=1).shape == (2, 8)
    with pytest.raises(RetrievalInputError, match="n=6 is larger than the number of ranked items"):
        alpha_qe(Q, X, idx, n=6)
    with pytest.raises(RetrievalInputError, match="n must be a positive integer"):
        alpha_dba(X, n=0)
    with pytest.raises(RetrievalInputError, match="alpha must be >= 0"):
        alpha_qe(Q, X, idx, n=2, alpha=-1.0)
