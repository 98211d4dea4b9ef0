"""The example queries (W&B table rows, PNG grids): their rankings, relevance and AP are those of
the full evaluation, and they are drawn whatever the images are."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_labelled_evaluation import clustered
from test_retrieval_evaluation import _bench

from sg_train.figures import RELEVANCE_COLOURS, example_grid, example_strip, plot_retrieval_history, query_thumbnail
from sg_train.retrieval import RetrievalInputError, evaluate_descriptors, evaluate_labelled, search
from sg_train.retrieval.examples import labelled_examples, revisited_examples, select_queries


def test_queries_are_spread_over_the_list_and_the_same_every_time():
    assert select_queries(70, 8) == [0, 10, 20, 30, 39, 49, 59, 69]
    assert select_queries(5, 8) == [0, 1, 2, 3, 4]
    assert select_queries(70, 1) == [0] and select_queries(70, 0) == []
    with pytest.raises(RetrievalInputError, match="must be >= 0"):
        select_queries(10, -1)


@pytest.mark.parametrize("rerank", [False, True])
def test_revisited_examples_hold_the_evaluations_rankings_and_each_querys_ap(rerank):
    gnd, Q, X = _bench(nq=12, n=300)
    params = {"M": 40, "K": 4, "beta": 0.15}
    examples = revisited_examples(Q, X, gnd, range(12), k=6, rerank=rerank, **params)
    result = evaluate_descriptors(Q, X, gnd, rerank=rerank, **params)
    key = "rerank_mAP" if rerank else "mAP"
    for p in "EMH":  # the mean of the per-query APs is the benchmark's mAP
        aps = [e.rerank_ap[p] if rerank else e.ap[p] for e in examples]
        assert np.nanmean(aps) == pytest.approx(result[key][p], abs=1e-12)
    top, _ = search(Q, X, 6)
    for e in examples:
        assert e.ranks == tuple(top[e.query].tolist())
        entry = gnd["gnd"][e.query]
        for item, relevance in zip(e.ranks, e.relevance):
            expected = next((c for c in ("easy", "hard", "junk") if item in entry[c]), "negative")
            assert relevance == expected
        assert (e.rerank_ranks is not None) == rerank


def test_a_hand_made_query_its_results_relevance_and_ap():
    # database items at angles 0, 10, 20, 30, 40 degrees from the query: ranked in that order
    angles = torch.deg2rad(torch.tensor([30.0, 0.0, 40.0, 10.0, 20.0], dtype=torch.float64))
    X = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    Q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    gnd = [{"easy": np.array([3]), "hard": np.array([0]), "junk": np.array([4])}]
    (e,) = revisited_examples(Q, X, gnd, [0], k=4, rerank=False)
    assert e.ranks == (1, 3, 4, 0)
    assert e.relevance == ("negative", "easy", "junk", "hard")
    # M: positives 3 (rank 2) and 0 (rank 4, rank 3 once the junk item is removed): (1/2 + 2/3) / 2
    # (revisitop's trapezoid: p0 = j/r, p1 = (j+1)/(r+1), averaged: (0/1 + 1/2)/2 + (1/2 + 2/3)/2, over 2)
    assert e.ap["M"] == pytest.approx(((0 / 1 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    assert e.ap["E"] == pytest.approx((0 / 1 + 1 / 2) / 2)  # easy 3 at rank 2; hard and junk ignored
    assert e.ap["H"] == pytest.approx((0 / 1 + 1 / 2) / 2)  # hard 0 at rank 2 once 3 (easy) and 4 (junk) go


@pytest.mark.parametrize("rerank", [False, True])
def test_labelled_examples_leave_the_query_out_and_average_to_map_at_r(rerank):
    X, labels = clustered(50, 6)
    labels[0] = 77  # a class of one: its AP is n/a
    ids = torch.arange(50)
    params = {"M": 12, "K": 3, "beta": 0.15}
    examples = labelled_examples(X, X, labels, labels, range(50), k=5, query_gallery_ids=ids, rerank=rerank, **params)
    result = evaluate_labelled(X, X, labels, labels, query_gallery_ids=ids, rerank=rerank, **params)
    got = [e.rerank_ap["MAP@R"] if rerank else e.ap["MAP@R"] for e in examples]
    assert math.isnan(got[0])
    assert np.nanmean(got) == pytest.approx(result["rerank_metrics" if rerank else "metrics"]["MAP@R"], abs=1e-12)
    for e in examples:
        for ranks, relevance in ((e.ranks, e.relevance), (e.rerank_ranks or e.ranks, e.rerank_relevance or e.relevance)):
            assert e.query not in ranks and len(ranks) == 5
            assert relevance == tuple("positive" if labels[r] == labels[e.query] else "negative" for r in ranks)


def test_bad_example_requests_are_refused():
    gnd, Q, X = _bench(nq=3, n=50)
    with pytest.raises(RetrievalInputError, match=r"must lie in \[0, 3\)"):
        revisited_examples(Q, X, gnd, [3], rerank=False)
    with pytest.raises(RetrievalInputError, match="must be >= 1"):
        revisited_examples(Q, X, gnd, [0], k=0, rerank=False)


def _photo(path, colour, size=(40, 30)):
    Image.new("RGB", size, colour).save(path)
    return str(path)


def test_grids_frame_results_by_relevance_and_survive_unreadable_images(tmp_path):
    gnd, Q, X = _bench(nq=2, n=6)
    database = [_photo(tmp_path / f"db{i}.jpg", (10 * i, 50, 90)) for i in range(5)]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    database.append(str(tmp_path / "broken.jpg"))
    queries = [_photo(tmp_path / "q0.png", (200, 10, 10), (80, 60)), str(tmp_path / "missing.jpg")]
    examples = revisited_examples(Q, X, gnd, [0, 1], k=6, rerank=True, M=6, K=2)
    grid = example_grid(examples, queries, [[10, 10, 50, 40], None], database, title="rsynth", size=64)
    assert grid.mode == "RGB" and grid.height > 4 * 64 and grid.width > 7 * 64
    strip = example_strip(database[:2], ["easy", "negative"], size=64)
    assert strip.size == (128, 64)
    assert strip.getpixel((1, 32)) == RELEVANCE_COLOURS["easy"] and strip.getpixel((127, 32)) == RELEVANCE_COLOURS["negative"]
    assert query_thumbnail(str(tmp_path / "missing.jpg"), None, 64).size == (64, 64)  # "unreadable" tile
    boxed = np.asarray(query_thumbnail(queries[0], [10, 10, 50, 40], 80))  # 80 x 60 shown at scale 1
    assert tuple(boxed[10 + 10, 10 + 10]) == (30, 120, 255)  # the box outline, offset by the centring (0, 10)


def test_curves_of_every_metric_over_the_epochs(tmp_path):
    history = [{"stage": "before_training", "epoch": 0, "per_dataset": {"rsynth": {"mAP": dict.fromkeys("EMH", 0.2)}}},
               *({"stage": "trained", "epoch": e, "per_dataset": {
                   "rsynth": {"mAP": dict.fromkeys("EMH", 0.3 + e / 10), "rerank_mAP": {"E": 0.5, "M": None, "H": 0.4}},
                   "held_out": {"metrics": {"MAP@R": 0.5, "num_queries_scored": 9}}}} for e in range(3))]
    path = plot_retrieval_history(history, tmp_path / "curves" / "retrieval_curves.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height
