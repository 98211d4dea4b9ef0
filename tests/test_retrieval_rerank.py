"""superglobal_rerank against the per-query, per-item loop written from docs/design.md §4."""
import numpy as np
import pytest
import torch
from test_retrieval_reference import clustered_descriptors, random_gnd, random_unit, ref_superglobal_rerank

from sg_train.retrieval import RetrievalInputError, revisited_map, search, superglobal_rerank


def _data(seed, nq=12, n=400, dim=48, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    gnd = random_gnd(nq, n, rng, sizes=((5, 30), (5, 30), (0, 20)))
    Q, X = clustered_descriptors(gnd, dim, rng, noise=3.0, dtype=dtype)
    return gnd, Q, X


@pytest.mark.parametrize("M,K,beta,chunk", [(100, 9, 0.15, None), (60, 3, 0.5, 5), (400, 9, 0.15, 1), (37, 0, 0.15, 4)])
def test_equals_reference_loop_fp64(M, K, beta, chunk):
    gnd, Q, X = _data(M)
    idx, _ = search(Q, X, 400)
    ours = superglobal_rerank(Q, X, idx, M=M, K=K, beta=beta, query_chunk=chunk)
    ref = ref_superglobal_rerank(Q, X, idx, M=M, K=K, beta=beta)
    assert torch.equal(ours, ref)
    assert torch.equal(ours[:, M:], idx[:, M:])  # past M: original order
    assert not torch.equal(ours[:, :M], idx[:, :M])  # it did reorder something
    assert torch.equal(ours[:, :M].sort(dim=1).values, idx[:, :M].sort(dim=1).values)  # same set


def test_fp32_matches_reference_up_to_float_ties():
    gnd, Q, X = _data(1, nq=20, n=1500, dim=128, dtype=torch.float32)
    idx, _ = search(Q, X, 1000)
    ours = superglobal_rerank(Q, X, idx)
    ref = ref_superglobal_rerank(Q, X, idx)
    assert (ours == ref).float().mean() > 0.995  # differences only where float rounding swaps near-ties
    a, b = revisited_map(ours, gnd), revisited_map(ref, gnd)
    for p in "EMH":
        assert a[p]["mAP"] == pytest.approx(b[p]["mAP"], abs=2e-3)


def test_exact_ties_from_duplicate_descriptors():
    # duplicated database rows tie exactly everywhere; orders agree up to swapping duplicates
    rng = np.random.default_rng(2)
    Q, base = random_unit(6, 16, rng, torch.float64), random_unit(120, 16, rng, torch.float64)
    X = torch.cat([base, base[:40]])  # rows 120..159 duplicate rows 0..39
    group = torch.cat([torch.arange(120), torch.arange(40)])
    idx, _ = search(Q, X, 160)
    ours = superglobal_rerank(Q, X, idx, M=80, K=5)
    ref = ref_superglobal_rerank(Q, X, idx, M=80, K=5)
    assert torch.equal(group[ours], group[ref])


def test_fewer_columns_than_M_and_input_types(tmp_path):
    gnd, Q, X = _data(3, nq=5, n=200, dim=16)
    idx, _ = search(Q, X, 50)
    ours = superglobal_rerank(Q, X, idx, M=400, K=9)  # only 50 ranked: rerank those
    assert torch.equal(ours, ref_superglobal_rerank(Q, X, idx, M=400, K=9))
    # numpy / fp16 memmap database and numpy ranking give the same as the fp32 tensors
    path = tmp_path / "X.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=tuple(X.shape))
    mm[:] = X.numpy().astype(np.float16)
    mm.flush()
    X16 = torch.from_numpy(np.array(mm)).float()
    Q32 = Q.float()
    from_map = superglobal_rerank(Q32.numpy(), np.memmap(path, dtype=np.float16, mode="r", shape=tuple(X.shape)),
                                  idx.numpy(), M=40, K=4)
    assert torch.equal(from_map, superglobal_rerank(Q32, X16, idx, M=40, K=4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_equals_cpu():
    gnd, Q, X = _data(4, dtype=torch.float64)
    idx, _ = search(Q, X, 200)
    assert torch.equal(superglobal_rerank(Q.cuda(), X.cuda(), idx.cuda(), M=100).cpu(),
                       superglobal_rerank(Q, X, idx, M=100))


def test_bad_inputs():
    gnd, Q, X = _data(5, nq=3, n=60, dim=8)
    idx, _ = search(Q, X, 30)
    with pytest.raises(RetrievalInputError, match=r"M=9 is smaller than K\+1=10"):
        superglobal_rerank(Q, X, idx, M=9, K=9)
    with pytest.raises(RetrievalInputError, match=r"K\+1=10 .* from the 5 ranked items"):
        superglobal_rerank(Q, X, idx[:, :5], M=400, K=9)
    with pytest.raises(RetrievalInputError, match="idx has 2 rows but there are 3 queries"):
        superglobal_rerank(Q, X, idx[:2])
    with pytest.raises(RetrievalInputError, match=r"outside \[0, 60\)"):
        superglobal_rerank(Q, X, idx + 50, M=20, K=3)
    with pytest.raises(RetrievalInputError, match="dimensions differ"):
        superglobal_rerank(Q[:, :4], X, idx)
    bad = X.clone()
    bad[int(idx[0, 3])] = float("nan")
    with pytest.raises(RetrievalInputError, match="non-finite"):
        superglobal_rerank(Q, bad, idx, M=20, K=3)
