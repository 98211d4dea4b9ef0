"""revisited_map against the slow protocol loop; the exact top-k variant against the full ranking."""
import numpy as np
import pytest
import torch
from test_retrieval_reference import clustered_descriptors, random_gnd, ref_revisited_map

from sg_train.retrieval import (
    GndEntries,
    GroundTruthError,
    RetrievalInputError,
    revisited_map,
    revisited_map_topk,
    search,
    search_with_tail,
    tail_positions,
)


def assert_same(ours, ref, tol=1e-12):
    for p in "EMH":
        assert ours[p]["mAP"] == pytest.approx(ref[p]["mAP"], abs=tol), p
        for k, v in ref[p]["mP"].items():
            assert ours[p]["mP"][k] == pytest.approx(v, abs=tol), (p, k)


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_loop_on_random_rankings(seed):
    rng = np.random.default_rng(seed)
    nq, n = 25, 300
    gnd = random_gnd(nq, n, rng)  # junk, queries without easy or hard positives, one with none
    ranks = np.stack([rng.permutation(n) for _ in range(nq)])
    ours = revisited_map(ranks, gnd, kappas=(1, 5, 10, 50))
    assert_same(ours, ref_revisited_map(ranks, gnd["gnd"], kappas=(1, 5, 10, 50)))
    for p in "EMH":
        assert 0.0 <= ours[p]["mAP"] <= 1.0
        expected = sum(1 for g in gnd["gnd"] if len(g["easy"]) * (p in "EM") + len(g["hard"]) * (p in "MH"))
        assert ours[p]["n_queries"] == expected < nq


def test_matches_reference_on_realistic_rankings_torch_input():
    rng = np.random.default_rng(7)
    gnd = random_gnd(30, 500, rng, sizes=((5, 60), (5, 60), (5, 80)))
    Q, X = clustered_descriptors(gnd, 32, rng, noise=2.0)
    ranks = torch.argsort(Q @ X.T, dim=1, descending=True)
    ours = revisited_map(ranks, gnd)
    assert_same(ours, ref_revisited_map(ranks.numpy(), gnd["gnd"]))
    assert 0.2 < ours["M"]["mAP"] < 1.0  # not a trivial case


def test_overlapping_and_duplicated_gnd_lists_follow_revisitop():
    # an item both easy and junk, an item listed twice: revisitop counts len() of the lists
    rng = np.random.default_rng(3)
    n = 50
    gnd = [{"easy": [1, 2, 2, 7], "hard": [9, 3], "junk": [2, 4, 11]}, {"easy": [0], "hard": [], "junk": [0, 5]}]
    ranks = np.stack([rng.permutation(n) for _ in range(2)])
    assert_same(revisited_map(ranks, gnd), ref_revisited_map(ranks, gnd))


def test_partial_rankings_as_revisitop_treats_them():
    rng = np.random.default_rng(4)
    n = 200
    gnd = random_gnd(10, n, rng, sizes=((3, 20), (3, 20), (0, 20)), empty_fraction=0.0)
    full = np.stack([rng.permutation(n) for _ in range(10)])
    for g, row in zip(gnd["gnd"], full):  # each query has one positive of each kind up front
        first = g["easy"][:1] + g["hard"][:1]
        rest = [i for i in row if i not in first]
        row[:] = np.array(first + rest)
    head = full[:, :120]
    assert_same(revisited_map(head, gnd), ref_revisited_map(head, gnd["gnd"]))


def test_hand_example():
    # P n P J P: AP = 55/72 (see the reference's own test); Hard has no positives -> nan, 0 queries
    gnd = [{"easy": [10, 12, 14], "hard": [], "junk": [13]}]
    res = revisited_map(np.array([[10, 11, 12, 13, 14]]), gnd, kappas=(1, 3))
    assert res["E"]["mAP"] == pytest.approx(55 / 72)
    assert res["E"]["mP"] == pytest.approx({1: 1.0, 3: 2 / 3})
    assert np.isnan(res["H"]["mAP"]) and res["H"]["n_queries"] == 0


def test_bad_inputs_are_named():
    gnd = {"imlist": ["a", "b", "c"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": [5]}]}
    with pytest.raises(GroundTruthError, match=r"gnd\[0\]\['junk'\] index 5 is out of range for imlist of 3"):
        revisited_map(np.array([[0, 1, 2]]), gnd)
    gnd["gnd"][0]["junk"] = [2]
    with pytest.raises(RetrievalInputError, match="2 rows but the ground truth has 1 queries"):
        revisited_map(np.array([[0, 1, 2], [2, 1, 0]]), gnd)
    with pytest.raises(RetrievalInputError, match="row 0 lists database item 0 more than once"):
        revisited_map(np.array([[0, 0, 1]]), gnd)
    with pytest.raises(RetrievalInputError, match="index 3, out of range for imlist of 3 images"):
        revisited_map(np.array([[0, 3, 1]]), gnd)
    with pytest.raises(RetrievalInputError, match="negative"):
        revisited_map(np.array([[0, -1, 1]]), gnd)
    with pytest.raises(RetrievalInputError, match="integer database indices"):
        revisited_map(np.array([[0.0, 1.0, 2.0]]), gnd)
    with pytest.raises(RetrievalInputError, match="kappas"):
        revisited_map(np.array([[0, 1, 2]]), gnd, kappas=(0,))
    with pytest.raises(GroundTruthError, match=r"gnd\[0\] lacks key 'hard'"):
        revisited_map(np.array([[0, 1, 2]]), [{"easy": [0], "junk": []}])


# ------------------------------------------------------------------ exact top-k variant

def _exact_data(rng, nq=12, n=400, dim=16, dup_rows=30):
    """Descriptors whose products and sums are exact in fp16/fp32 (multiples of 1/8), with
    duplicated rows: many exact score ties, so the tie rule (lower index first) is tested."""
    gnd = random_gnd(nq, n, rng, sizes=((2, 30), (2, 30), (0, 30)))
    Q = torch.from_numpy(rng.integers(-4, 5, (nq, dim)) / 8.0).float()
    X = torch.from_numpy(rng.integers(-4, 5, (n, dim)) / 8.0).float()
    src = rng.choice(n, dup_rows, replace=False)
    X[rng.choice(n, dup_rows, replace=False)] = X[src]
    return gnd, Q, X


def full_ranking(Q, X, head):
    """head (nq, k) then the rest by descending score, ties by ascending index (stable sort)."""
    S = (Q.double() @ X.double().T).numpy()
    rows = []
    for q, h in enumerate(np.asarray(head)):
        rest = np.setdiff1d(np.arange(X.shape[0]), h)
        rest = rest[np.argsort(-S[q, rest], kind="stable")]
        rows.append(np.concatenate([h, rest]))
    return np.stack(rows)


@pytest.mark.parametrize("k", [1, 17, 100, 400])
def test_topk_variant_equals_full_ranking_with_ties(k):
    rng = np.random.default_rng(k)
    gnd, Q, X = _exact_data(rng)
    head, _ = search(Q, X, k, chunk_size=64)
    head = head.numpy()
    # the head in any order (here reversed), as after reranking
    head = head[:, ::-1].copy()
    ours = revisited_map_topk(Q, X, head, gnd, chunk_size=37)
    assert_same(ours, ref_revisited_map(full_ranking(Q, X, head), gnd["gnd"]))


def test_topk_variant_on_fp16_memmap(tmp_path):
    rng = np.random.default_rng(11)
    gnd, Q, X = _exact_data(rng, n=600, dim=32)
    path = tmp_path / "X.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=tuple(X.shape))
    mm[:] = X.numpy().astype(np.float16)
    mm.flush()
    del mm
    Xm = np.memmap(path, dtype=np.float16, mode="r", shape=tuple(X.shape))
    head, _ = search(Q, Xm, 50, chunk_size=100)
    ours = revisited_map_topk(Q, Xm, head, gnd, chunk_size=77)
    assert_same(ours, ref_revisited_map(full_ranking(Q, X, head.numpy()), gnd["gnd"]))


def test_search_with_tail_shares_one_pass_and_equals_separate_pass():
    rng = np.random.default_rng(5)
    gnd, Q, X = _exact_data(rng)
    idx, scores, tail = search_with_tail(Q, X, 40, gnd, chunk_size=50)
    ref_idx, ref_scores = search(Q, X, 40)
    assert torch.equal(scores, ref_scores)
    separate = tail_positions(Q, X, idx, gnd, chunk_size=64)
    np.testing.assert_array_equal(tail.codes, separate.codes)
    np.testing.assert_array_equal(tail.positions, separate.positions)
    # reused for a reordered head with the same sets, refused for another top-k set
    res = revisited_map_topk(Q, X, idx.flip(1), gnd, tail=tail)
    assert_same(res, ref_revisited_map(full_ranking(Q, X, idx.flip(1).numpy()), gnd["gnd"]))
    other = idx.clone()
    other[0, 0] = int(np.setdiff1d(np.arange(X.shape[0]), idx[0].numpy())[0])
    with pytest.raises(RetrievalInputError, match="different database or top-k set"):
        revisited_map_topk(Q, X, other, gnd, tail=tail)


def test_realistic_float_data_topk_equals_full():
    rng = np.random.default_rng(9)
    gnd = random_gnd(20, 3000, rng, sizes=((5, 80), (5, 80), (5, 80)))
    Q, X = clustered_descriptors(gnd, 64, rng, noise=3.0, dtype=torch.float64)
    head, _ = search(Q, X, 200)
    ours = revisited_map_topk(Q, X, head, GndEntries.from_gnd(gnd))
    ref = ref_revisited_map(full_ranking(Q, X, head.numpy()), gnd["gnd"])
    assert_same(ours, ref)
    assert ours["H"]["mAP"] < 0.9  # positives really lie beyond the top-200


def test_topk_bad_inputs():
    rng = np.random.default_rng(1)
    gnd, Q, X = _exact_data(rng, nq=3, n=50)
    with pytest.raises(RetrievalInputError, match="more than once"):
        revisited_map_topk(Q, X, np.array([[0, 0], [1, 2], [3, 4]]), gnd)
    with pytest.raises(RetrievalInputError, match=r"outside \[0, 50\)"):
        revisited_map_topk(Q, X, np.array([[0, 50], [1, 2], [3, 4]]), gnd)
    with pytest.raises(RetrievalInputError, match="between 1 and n=50 columns"):
        revisited_map_topk(Q, X, np.zeros((3, 0), dtype=np.int64), gnd)
    with pytest.raises(RetrievalInputError, match="descriptor dimensions differ"):
        revisited_map_topk(Q[:, :5], X, np.array([[0, 1], [1, 2], [3, 4]]), gnd)
