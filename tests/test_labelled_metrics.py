"""labelled_retrieval_metrics against values worked out by hand, and against pytorch-metric-learning's
AccuracyCalculator fed the same rankings."""
import numpy as np
import pytest
import torch

from sg_train.retrieval import RetrievalInputError, search
from sg_train.retrieval.labelled_metrics import labelled_retrieval_metrics, required_rank_columns

try:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import return_results
except ImportError:  # pragma: no cover - depends on the environment
    AccuracyCalculator = None


def assert_metrics(ours, expected):
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


# Case A: separate query and gallery sets. Gallery labels: label 0 at items 0, 2, 5 (R = 3),
# label 1 at 1, 4 (R = 2), label 2 at 3 (R = 1).
GALLERY_A = np.array([0, 1, 0, 2, 1, 0])
QUERIES_A = np.array([0, 1, 2, 7])
RANKS_A = np.array([
    [1, 0, 3, 2, 4, 5],  # label 0: relevant at positions 2, 4, 6
    [4, 1, 0, 2, 3, 5],  # label 1: relevant at 1, 2
    [0, 2, 5, 1, 4, 3],  # label 2: relevant at 6
    [0, 1, 2, 3, 4, 5],  # label 7: no gallery item, not scored
])


def test_separate_query_and_gallery_by_hand():
    ours = labelled_retrieval_metrics(RANKS_A, QUERIES_A, GALLERY_A, ks=(1, 2, 5, 6))
    # per query (q0, q1, q2); P@i at the relevant positions:
    # q0: 1/2 at 2, 2/4 at 4, 3/6 at 6; R = 3
    #     mAP@1 = 0, mAP@2 = (1/2)/3 = 1/6, mAP@5 = (1/2 + 1/2)/3 = 1/3, mAP@6 = (1/2+1/2+1/2)/3 = 1/2
    #     MAP@R = (1/2)/3 = 1/6 (positions <= 3), R-precision = 1/3
    # q1: 1/1 at 1, 2/2 at 2; R = 2: mAP@1 = 1/2, mAP@2,5,6 = 2/2 = 1, MAP@R = 1, R-precision = 1
    # q2: 1/6 at 6; R = 1: mAP@1,2,5 = 0, mAP@6 = 1/6, MAP@R = 0, R-precision = 0
    assert_metrics(ours, {
        "precision@1": (0 + 1 + 0) / 3,
        "recall@1": (0 + 1 + 0) / 3,
        "recall@2": (1 + 1 + 0) / 3,
        "recall@5": (1 + 1 + 0) / 3,
        "recall@6": (1 + 1 + 1) / 3,
        "mAP@1": (0 + 1 / 2 + 0) / 3,
        "mAP@2": (1 / 6 + 1 + 0) / 3,
        "mAP@5": (1 / 3 + 1 + 0) / 3,
        "mAP@6": (1 / 2 + 1 + 1 / 6) / 3,
        "MAP@R": (1 / 6 + 1 + 0) / 3,
        "R-precision": (1 / 3 + 1 + 0) / 3,
        "num_queries_scored": 3,
    })


def test_top_k_rankings_give_the_full_ranking_values_and_too_short_ones_raise():
    full = labelled_retrieval_metrics(RANKS_A, QUERIES_A, GALLERY_A, ks=(1, 2, 5))
    # max(max(ks) = 5, R = 3), no query in the gallery
    assert required_rank_columns(QUERIES_A, GALLERY_A, ks=(1, 2, 5)) == 5
    assert labelled_retrieval_metrics(RANKS_A[:, :5], QUERIES_A, GALLERY_A, ks=(1, 2, 5)) == full
    with pytest.raises(RetrievalInputError, match=r"has 4 columns.*at least 5 columns.*k=5"):
        labelled_retrieval_metrics(RANKS_A[:, :4], QUERIES_A, GALLERY_A, ks=(1, 2, 5))
    # MAP@R alone needs the top R = 3 of query 0
    assert required_rank_columns(QUERIES_A, GALLERY_A, ks=(1,)) == 3
    with pytest.raises(RetrievalInputError, match=r"R = 3 here, for query 0.*at least 3 columns"):
        labelled_retrieval_metrics(RANKS_A[:, :2], QUERIES_A, GALLERY_A, ks=(1,))


# Case B: leave-one-out, the set is both query and gallery. Labels: 0 at 0, 1, 3; 1 at 2, 4.
LABELS_B = np.array([0, 0, 1, 0, 1])
RANKS_B = np.array([
    [0, 2, 1, 4, 3],  # itself first; without it [2, 1, 4, 3]: relevant at 2, 4 (R = 2)
    [3, 1, 0, 2, 4],  # itself second; [3, 0, 2, 4]: relevant at 1, 2 (R = 2)
    [4, 0, 1, 3, 2],  # itself last; [4, 0, 1, 3]: relevant at 1 (R = 1)
    [2, 4, 3, 0, 1],  # [2, 4, 0, 1]: relevant at 3, 4 (R = 2)
    [4, 2, 0, 1, 3],  # [2, 0, 1, 3]: relevant at 1 (R = 1)
])


def test_leave_one_out_removes_each_query_from_its_own_ranking_by_hand():
    ours = labelled_retrieval_metrics(RANKS_B, LABELS_B, LABELS_B, ks=(1, 2, 4, 50), query_gallery_ids=np.arange(5))
    # q0: P@2 = 1/2, P@4 = 2/4; mAP@1 = 0, mAP@2 = (1/2)/2 = 1/4, mAP@4 = (1/2 + 1/2)/2 = 1/2,
    #     MAP@R = (1/2)/2 = 1/4, R-precision = 1/2
    # q1: P@1 = 1, P@2 = 1; mAP@1 = 1/2, mAP@2 = mAP@4 = MAP@R = R-precision = 1
    # q2, q4: P@1 = 1, R = 1: everything 1
    # q3: P@3 = 1/3, P@4 = 2/4; mAP@1 = mAP@2 = 0, mAP@4 = (1/3 + 1/2)/2 = 5/12, MAP@R = 0, R-precision = 0
    # k = 50: the self-removed rankings hold 4 items, so @50 is @4
    assert_metrics(ours, {
        "precision@1": (0 + 1 + 1 + 0 + 1) / 5,
        "recall@1": (0 + 1 + 1 + 0 + 1) / 5,
        "recall@2": (1 + 1 + 1 + 0 + 1) / 5,
        "recall@4": (1 + 1 + 1 + 1 + 1) / 5,
        "recall@50": (1 + 1 + 1 + 1 + 1) / 5,
        "mAP@1": (0 + 1 / 2 + 1 + 0 + 1) / 5,
        "mAP@2": (1 / 4 + 1 + 1 + 0 + 1) / 5,
        "mAP@4": (1 / 2 + 1 + 1 + 5 / 12 + 1) / 5,
        "mAP@50": (1 / 2 + 1 + 1 + 5 / 12 + 1) / 5,
        "MAP@R": (1 / 4 + 1 + 1 + 0 + 1) / 5,
        "R-precision": (1 / 2 + 1 + 1 + 0 + 1) / 5,
        "num_queries_scored": 5,
    })
    # Without the ids each query's own item counts: the first items are 0 (itself), 3, 4, 2, 4 (itself)
    # -> hits for q0, q1, q2, q4; and R is the label count itself included
    plain = labelled_retrieval_metrics(RANKS_B, LABELS_B, LABELS_B, ks=(1,))
    assert plain["precision@1"] == pytest.approx(4 / 5)


def test_a_truncated_row_without_its_query_keeps_its_length():
    # ks = (1, 2): max(2, R = 2) + 1 = 3 columns. Row 2 [4, 0, 1] lacks its query 2 (it ranks below):
    # it is already the top 3 of the self-removed ranking. Row 0 [0, 2, 1] loses itself: [2, 1].
    ids = np.arange(5)
    assert required_rank_columns(LABELS_B, LABELS_B, ks=(1, 2), query_gallery_ids=ids) == 3
    full = labelled_retrieval_metrics(RANKS_B, LABELS_B, LABELS_B, ks=(1, 2), query_gallery_ids=ids)
    cut = labelled_retrieval_metrics(RANKS_B[:, :3], LABELS_B, LABELS_B, ks=(1, 2), query_gallery_ids=ids)
    assert cut == full
    with pytest.raises(RetrievalInputError, match="at least 3 columns"):
        labelled_retrieval_metrics(RANKS_B[:, :2], LABELS_B, LABELS_B, ks=(1, 2), query_gallery_ids=ids)


def test_mixed_queries_in_and_out_of_the_gallery_and_a_query_alone_with_its_label_by_hand():
    gallery = torch.tensor([5, 6, 6, 7])
    queries = torch.tensor([5, 6, 6, 7])
    ids = torch.tensor([0, 1, -1, -1])  # queries 0 and 1 are gallery items 0 and 1; 2 and 3 are not
    ranks = torch.tensor([
        [1, 0, 2, 3],  # label 5: its only gallery item is itself -> R = 0, not scored
        [3, 1, 2, 0],  # label 6, R = 1 (item 2); without itself [3, 2, 0]: relevant at 2
        [2, 0, 1, 3],  # label 6, R = 2 (items 1, 2): relevant at 1, 3
        [0, 1, 2, 3],  # label 7, R = 1 (item 3): relevant at 4
    ])
    ours = labelled_retrieval_metrics(ranks, queries, gallery, ks=(1, 2, 4), query_gallery_ids=ids)
    # q1: mAP@1 = 0, mAP@2 = mAP@4 = (1/2)/1, MAP@R = R-precision = 0
    # q2: mAP@1 = mAP@2 = 1/2, mAP@4 = (1 + 2/3)/2 = 5/6, MAP@R = 1/2, R-precision = 1/2
    # q3: mAP@1 = mAP@2 = 0, mAP@4 = (1/4)/1, MAP@R = R-precision = 0
    assert_metrics(ours, {
        "precision@1": (0 + 1 + 0) / 3,
        "recall@1": (0 + 1 + 0) / 3,
        "recall@2": (1 + 1 + 0) / 3,
        "recall@4": (1 + 1 + 1) / 3,
        "mAP@1": (0 + 1 / 2 + 0) / 3,
        "mAP@2": (1 / 2 + 1 / 2 + 0) / 3,
        "mAP@4": (1 / 2 + 5 / 6 + 1 / 4) / 3,
        "MAP@R": (0 + 1 / 2 + 0) / 3,
        "R-precision": (0 + 1 / 2 + 0) / 3,
        "num_queries_scored": 3,
    })


def test_map_at_k_divides_by_r_as_pml_and_k_beyond_the_gallery_is_the_whole_ranking():
    # One query, R = 4, all four relevant items ranked first.
    # mAP@2 = (1/1 + 2/2)/4 = 1/2 (PML's divisor R, not min(2, R)); MAP@R = (1 + 1 + 1 + 1)/4 = 1;
    # k = 50 > 5 gallery items: the whole ranking, (1 + 1 + 1 + 1)/4 = 1
    ours = labelled_retrieval_metrics(np.array([[0, 1, 2, 3, 4]]), np.array([3]), np.array([3, 3, 3, 3, 9]),
                                      ks=(2, 50))
    assert ours["mAP@2"] == 0.5
    assert ours["mAP@50"] == ours["MAP@R"] == ours["R-precision"] == ours["recall@2"] == 1.0


@pytest.mark.parametrize("call, message", [
    (lambda: labelled_retrieval_metrics(RANKS_A.T, QUERIES_A, GALLERY_A),
     r"ranks has 6 rows but query_labels has 4 queries \(it looks transposed"),
    (lambda: labelled_retrieval_metrics(RANKS_A, QUERIES_A, GALLERY_A[:5]), "6 columns but gallery_labels only 5"),
    (lambda: labelled_retrieval_metrics(RANKS_A, QUERIES_A.astype(float), GALLERY_A),
     "query_labels must hold integer labels, got dtype float64"),
    (lambda: labelled_retrieval_metrics(RANKS_A, QUERIES_A, GALLERY_A, ks=(0, 5)), "ks must be"),
    (lambda: labelled_retrieval_metrics(RANKS_A, QUERIES_A + 10, GALLERY_A), "none of the 4 queries"),
    (lambda: labelled_retrieval_metrics(np.where(RANKS_A == 5, 0, RANKS_A), QUERIES_A, GALLERY_A),
     "ranks row 0 lists gallery item 0 more than once"),
    (lambda: labelled_retrieval_metrics(RANKS_A - 1, QUERIES_A, GALLERY_A),
     r"ranks\[0, 1\] = -1 is not a gallery index"),
    (lambda: labelled_retrieval_metrics(RANKS_B, LABELS_B, LABELS_B, query_gallery_ids=np.array([0, 1, 3, 2, 4])),
     "query 2 is said to be gallery item 3 .* label 1 differs from that item's label 0"),
    (lambda: labelled_retrieval_metrics(RANKS_B, LABELS_B, LABELS_B, query_gallery_ids=np.arange(4)),
     "query_gallery_ids has 4 entries"),
])
def test_bad_input_names_what_is_wrong(call, message):
    with pytest.raises(RetrievalInputError, match=message):
        call()


def clustered(rng, centres, labels):
    """Unit descriptors around one centre per label."""
    x = centres[labels] + 1.5 * rng.normal(size=(labels.shape[0], centres.shape[1]))
    return torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=1)


def pml_accuracy(ranking, k, query, query_labels, reference=None, reference_labels=None):
    """PML's metrics with its kNN replaced by the given full ranking (the same order for both)."""
    def knn(_query, num_k, _reference, ref_includes_query):
        idx = ranking[:, : num_k + int(ref_includes_query)]
        return return_results(torch.zeros(idx.shape), idx, ref_includes_query)  # PML's self-match removal
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision", "mean_average_precision_at_r",
                                       "r_precision"), k=k, device=torch.device("cpu"), knn_func=knn)
    return calc.get_accuracy(query, query_labels, reference, reference_labels)


@pytest.mark.skipif(AccuracyCalculator is None, reason="pytorch-metric-learning is not installed "
                    "(pip install pytorch-metric-learning) for the cross-check against its AccuracyCalculator")
@pytest.mark.parametrize("seed", range(3))
def test_matches_pml_accuracy_calculator_on_separate_sets(seed):
    rng = np.random.default_rng(seed)
    gallery_labels = rng.integers(0, 12, 300)
    query_labels = rng.integers(0, 15, 60)  # labels 12-14 have no gallery item: PML's lone queries
    centres = rng.normal(size=(15, 16))
    Q, X = clustered(rng, centres, query_labels), clustered(rng, centres, gallery_labels)
    ranking, _ = search(Q, X, 300)  # the whole gallery, best first
    gl, ql = torch.from_numpy(gallery_labels), torch.from_numpy(query_labels)
    ref = pml_accuracy(ranking, None, Q, ql, X, gl)  # k = None: the whole ranking
    ours = labelled_retrieval_metrics(ranking, ql, gl, ks=(300, 10))
    assert 0 < ours["num_queries_scored"] < 60
    assert 0.05 < ours["MAP@R"] < 0.95  # not a trivial case
    for name, key in (("precision_at_1", "precision@1"), ("mean_average_precision", "mAP@300"),
                      ("mean_average_precision_at_r", "MAP@R"), ("r_precision", "R-precision")):
        assert ours[key] == pytest.approx(ref[name], abs=1e-12), key
    ref10 = pml_accuracy(ranking, 10, Q, ql, X, gl)
    assert ours["mAP@10"] == pytest.approx(ref10["mean_average_precision"], abs=1e-12)
    # the top required_rank_columns give the same numbers
    need = required_rank_columns(ql, gl, ks=(300, 10))
    assert labelled_retrieval_metrics(ranking[:, :need].numpy(), ql.numpy(), gl.numpy(), ks=(300, 10)) == ours


@pytest.mark.skipif(AccuracyCalculator is None, reason="pytorch-metric-learning is not installed "
                    "(pip install pytorch-metric-learning) for the cross-check against its AccuracyCalculator")
@pytest.mark.parametrize("seed", range(3))
def test_matches_pml_accuracy_calculator_leave_one_out(seed):
    # ref_includes_query=True in PML; noisy scores put each query anywhere in its own ranking
    rng = np.random.default_rng(10 + seed)
    labels = rng.integers(0, 20, 250)
    labels[:2] = [20, 21]  # each alone with its label: PML's lone queries under ref_includes_query
    X = clustered(rng, rng.normal(size=(22, 16)), labels)
    scores = X @ X.T + 0.2 * torch.from_numpy(rng.normal(size=(250, 250))).float()
    ranking = torch.argsort(scores, dim=1, descending=True)
    assert (ranking[:, 0] != torch.arange(250)).any()
    gl = torch.from_numpy(labels)
    ids = torch.arange(250)
    ref = pml_accuracy(ranking, "max_bin_count", X, gl)  # reference=None: ref_includes_query=True
    r_max = int(torch.bincount(gl).max()) - 1
    ours = labelled_retrieval_metrics(ranking, gl, gl, ks=(r_max, 5), query_gallery_ids=ids)
    assert ours["num_queries_scored"] == 248
    for name, key in (("precision_at_1", "precision@1"), ("mean_average_precision", f"mAP@{r_max}"),
                      ("mean_average_precision_at_r", "MAP@R"), ("r_precision", "R-precision")):
        assert ours[key] == pytest.approx(ref[name], abs=1e-12), key
    ref5 = pml_accuracy(ranking, 5, X, gl)
    assert ours["mAP@5"] == pytest.approx(ref5["mean_average_precision"], abs=1e-12)
    need = required_rank_columns(gl, gl, ks=(r_max, 5), query_gallery_ids=ids)
    assert need == r_max + 1
    assert labelled_retrieval_metrics(ranking[:, :need], gl, gl, ks=(r_max, 5), query_gallery_ids=ids) == ours
