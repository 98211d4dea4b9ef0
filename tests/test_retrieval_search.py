"""Exact chunked search: equals a full sort, any chunking, fp16/memmap databases, clear errors."""
import importlib

import numpy as np
import pytest
import torch
from test_retrieval_reference import random_unit

from sg_train.retrieval import RetrievalInputError, search


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 1000])
@pytest.mark.parametrize("k", [1, 5, 120])
def test_equals_full_sort(chunk_size, k):
    rng = np.random.default_rng(0)
    Q, X = random_unit(9, 24, rng, torch.float64), random_unit(120, 24, rng, torch.float64)
    idx, scores = search(Q, X, k, chunk_size=chunk_size)
    full = Q @ X.T
    ref_scores, ref_idx = full.sort(dim=1, descending=True)
    assert idx.dtype == torch.long and idx.shape == (9, k)
    assert torch.equal(idx, ref_idx[:, :k])
    torch.testing.assert_close(scores, ref_scores[:, :k], rtol=0, atol=1e-12)


def test_fp16_database_accumulates_in_fp32_and_reads_memmap_in_chunks(tmp_path):
    rng = np.random.default_rng(1)
    Q = random_unit(5, 64, rng)
    X16 = random_unit(500, 64, rng).half()
    path = tmp_path / "X.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=(500, 64))
    mm[:] = X16.numpy()
    mm.flush()
    X_map = np.memmap(path, dtype=np.float16, mode="r", shape=(500, 64))
    idx, scores = search(Q, X_map, 10, chunk_size=33)
    assert scores.dtype == torch.float32
    ref = Q @ X16.float().T
    ref_s, ref_i = ref.topk(10, dim=1)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(scores, ref_s, rtol=0, atol=1e-6)
    idx_t, _ = search(Q, X16, 10)  # an fp16 tensor, too
    assert torch.equal(idx_t, ref_i)


def test_query_blocks_for_many_queries(monkeypatch):
    search_mod = importlib.import_module("sg_train.retrieval.search")  # the module, not the function
    monkeypatch.setattr(search_mod, "_SCORE_BLOCK_BYTES", 4 * 7 * 40)  # 7 queries x 40 rows per block
    rng = np.random.default_rng(2)
    Q, X = random_unit(30, 8, rng, torch.float64), random_unit(100, 8, rng, torch.float64)
    idx, _ = search(Q, X, 12, chunk_size=40)
    assert torch.equal(idx, (Q @ X.T).topk(12, dim=1).indices)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_database_with_cpu_queries():
    rng = np.random.default_rng(3)
    Q, X = random_unit(4, 32, rng), random_unit(300, 32, rng)
    idx, scores = search(Q, X.cuda().half(), 7, chunk_size=50)
    assert idx.device.type == "cuda"
    ref_i = (Q @ X.half().float().T).topk(7, dim=1).indices
    assert torch.equal(idx.cpu(), ref_i)


def test_bad_inputs():
    rng = np.random.default_rng(4)
    Q, X = random_unit(3, 8, rng), random_unit(20, 8, rng)
    with pytest.raises(RetrievalInputError, match=r"dimensions differ: Q is \(3, 7\) but X is \(20, 8\)"):
        search(Q[:, :7], X, 2)
    with pytest.raises(RetrievalInputError, match="empty database"):
        search(Q, X[:0], 1)
    with pytest.raises(RetrievalInputError, match="k=21 is larger than the database"):
        search(Q, X, 21)
    with pytest.raises(RetrievalInputError, match="k must be >= 1"):
        search(Q, X, 0)
    with pytest.raises(RetrievalInputError, match="2-D"):
        search(Q[0], X, 1)
    with pytest.raises(RetrievalInputError, match="floating-point"):
        search(Q, torch.ones(20, 8, dtype=torch.long), 1)
    bad_q = Q.clone()
    bad_q[1, 3] = float("nan")
    with pytest.raises(RetrievalInputError, match=r"non-finite values \(nan/inf\) in Q, first at row 1"):
        search(bad_q, X, 2)
    bad_x = X.clone()
    bad_x[13, 0] = float("inf")
    with pytest.raises(RetrievalInputError, match=r"non-finite .* in X \(database descriptors\), first at row 13"):
        search(Q, bad_x, 2, chunk_size=6)
