"""evaluate_descriptors (the call the callback and evaluate.py share) and the paper table."""
import math

import numpy as np
import pytest
import torch
from test_retrieval_reference import clustered_descriptors, random_gnd, ref_revisited_map, ref_superglobal_rerank

from sg_train.retrieval import (
    RetrievalInputError,
    evaluate_descriptors,
    format_results_table,
    revisited_map,
    search,
    superglobal_rerank,
)


def _bench(seed=0, nq=15, n=1200, dim=32, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    gnd = random_gnd(nq, n, rng, sizes=((5, 40), (5, 40), (2, 30)))
    Q, X = clustered_descriptors(gnd, dim, rng, noise=3.0, dtype=dtype)
    return gnd, Q, X


@pytest.mark.parametrize("topk", [100, 1200])
def test_equals_full_ranking_without_and_with_rerank(topk):
    gnd, Q, X = _bench()
    res = evaluate_descriptors(Q, X, gnd, rerank=True, M=80, K=5, topk=topk, chunk_size=100)
    full = torch.argsort(Q @ X.T, dim=1, descending=True)
    ref = ref_revisited_map(full.numpy(), gnd["gnd"])
    reranked_full = ref_superglobal_rerank(Q, X, full, M=80, K=5)
    ref_rr = ref_revisited_map(reranked_full.numpy(), gnd["gnd"])
    for p in "EMH":
        assert res["mAP"][p] == pytest.approx(ref[p]["mAP"], abs=1e-12)
        assert res["rerank_mAP"][p] == pytest.approx(ref_rr[p]["mAP"], abs=1e-12)
        assert res["mP"][p] == pytest.approx(ref[p]["mP"], abs=1e-12)
        assert 0 <= res["mAP"][p] <= 1
    assert res["search"] == {"backend": "torch", "topk": min(1200, max(topk, 80))}
    assert res["rerank_mAP"] != res["mAP"]


def test_no_rerank_keys_and_faiss_backend_agree():
    gnd, Q, X = _bench(1, dtype=torch.float32)
    a = evaluate_descriptors(Q, X, gnd, rerank=False)
    b = evaluate_descriptors(Q.numpy(), X.numpy(), gnd, rerank=False, backend="faiss")
    assert set(a) == {"mAP", "mP", "search"}
    assert b["search"]["backend"] == "faiss" and b["search"]["exact"]
    for p in "EMH":
        assert a["mAP"][p] == pytest.approx(b["mAP"][p], abs=1e-6)
    c = evaluate_descriptors(Q, X, gnd, rerank=True, backend="faiss", faiss_index="hnsw",
                             faiss_options={"ef_search": 400})
    assert 0 < c["search"]["recall@k"] <= 1


def test_matches_the_separate_api_calls():
    gnd, Q, X = _bench(2, n=600)
    res = evaluate_descriptors(Q, X, gnd, M=50, K=4, topk=600)
    idx, _ = search(Q, X, 600)
    assert res["mAP"] == {p: v["mAP"] for p, v in revisited_map(idx, gnd).items()}
    rr = revisited_map(superglobal_rerank(Q, X, idx, M=50, K=4), gnd)
    assert res["rerank_mAP"] == {p: v["mAP"] for p, v in rr.items()}


def test_bad_inputs():
    gnd, Q, X = _bench(3, nq=4, n=100)
    with pytest.raises(RetrievalInputError, match="3 query descriptors but the ground truth has 4 queries"):
        evaluate_descriptors(Q[:3], X, gnd)
    with pytest.raises(RetrievalInputError, match="99 database descriptors but the ground truth lists 100 images"):
        evaluate_descriptors(Q, X[:99], gnd)
    with pytest.raises(RetrievalInputError, match="unknown backend 'annoy'"):
        evaluate_descriptors(Q, X, gnd, backend="annoy")
    with pytest.raises(RetrievalInputError, match="empty database"):
        evaluate_descriptors(Q, X[:0], gnd["gnd"])
    bad = X.clone()
    bad[42, 3] = float("-inf")
    with pytest.raises(RetrievalInputError, match="non-finite .* at row 42"):
        evaluate_descriptors(Q, bad, gnd)


def test_table_layout():
    res = {"roxford5k": {"mAP": {"E": 0.841, "M": 0.6725, "H": 0.443}, "rerank_mAP": {"E": 0.9, "M": 0.8, "H": 0.7}},
           "rparis6k": {"mAP": {"E": 0.5, "M": 0.25, "H": math.nan}}}
    table = format_results_table(res)
    blocks = table.split("\n\n")
    assert len(blocks) == 2
    head, plain, rerank = blocks[0].splitlines()
    assert head.split() == ["roxford5k", "E", "M", "H"]
    assert plain.split()[-3:] == ["84.10", "67.25", "44.30"] and "global" in plain
    assert rerank.split()[-3:] == ["90.00", "80.00", "70.00"] and "rerank" in rerank
    assert blocks[1].splitlines()[1].split()[-3:] == ["50.00", "25.00", "n/a"]
    assert len(blocks[1].splitlines()) == 2  # no rerank row when not reranked
