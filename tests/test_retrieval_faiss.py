"""FAISS backend: the flat index equals exact search; approximate indices report their recall."""
import numpy as np
import pytest
import torch
from test_retrieval_reference import random_unit

from sg_train.retrieval import RetrievalInputError, faiss_search, search

pytest.importorskip("faiss")


def test_flat_equals_exact_search():
    rng = np.random.default_rng(0)
    Q, X = random_unit(10, 32, rng), random_unit(700, 32, rng)
    idx, scores, info = faiss_search(Q, X, 25, chunk_size=128)
    ref_idx, ref_scores = search(Q, X, 25)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-5)
    assert info["exact"] and info["index"] == "flat" and "recall@k" not in info


def test_flat_fp16_memmap_keeps_fp16_and_stays_exact(tmp_path):
    rng = np.random.default_rng(1)
    Q, X = random_unit(6, 64, rng), random_unit(300, 64, rng).half()
    path = tmp_path / "X.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=(300, 64))
    mm[:] = X.numpy()
    mm.flush()
    idx, _, _ = faiss_search(Q, np.memmap(path, dtype=np.float16, mode="r", shape=(300, 64)), 12)
    assert torch.equal(idx, search(Q, X, 12)[0])


@pytest.mark.parametrize("index,options", [("ivf", {"nlist": 8, "nprobe": 8}), ("ivf", {"nlist": 16, "nprobe": 1}),
                                           ("hnsw", {"hnsw_m": 16, "ef_search": 64})])
def test_approximate_indices_report_recall(index, options):
    rng = np.random.default_rng(2)
    Q, X = random_unit(20, 16, rng), random_unit(2000, 16, rng)
    idx, _, info = faiss_search(Q, X, 10, index=index, **options)
    exact = search(Q, X, 10)[0]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx.tolist(), exact.tolist())])
    assert info["recall@k"] == pytest.approx(overlap)
    assert 0.0 < info["recall@k"] <= 1.0 and info["k"] == 10 and not info["exact"]
    if options.get("nprobe") == 8 and options.get("nlist") == 8:
        assert info["recall@k"] == 1.0  # probing every list is exhaustive


def test_bad_inputs():
    rng = np.random.default_rng(3)
    Q, X = random_unit(2, 8, rng), random_unit(50, 8, rng)
    with pytest.raises(RetrievalInputError, match="unknown faiss index 'pq'"):
        faiss_search(Q, X, 3, index="pq")
    with pytest.raises(RetrievalInputError, match="k=51 is larger than the database"):
        faiss_search(Q, X, 51)
    bad = X.clone()
    bad[7, 1] = float("nan")
    with pytest.raises(RetrievalInputError, match=r"non-finite .* in X \(database descriptors\), first at row 7"):
        faiss_search(Q, bad, 3, chunk_size=4)
    if not __import__("sg_train.retrieval", fromlist=["faiss_gpu_available"]).faiss_gpu_available():
        with pytest.raises(RetrievalInputError, match="no GPU support"):
            faiss_search(Q, X, 3, use_gpu=True)
