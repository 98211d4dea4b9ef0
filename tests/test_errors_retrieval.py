"""All-zero descriptor rows are refused, naming the matrix, the count and the first rows; reranking
parameters are checked against the database size before any search or extraction."""
from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_retrieval_reference import clustered_descriptors, random_gnd, random_unit

from sg_train.retrieval import (
    RetrievalInputError,
    check_rerank_params,
    evaluate_descriptors,
    search,
    search_with_tail,
    superglobal_rerank,
    tail_positions,
)

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("evaluate_cli_retrieval", ROOT / "evaluate.py")
evaluate_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_cli)


def _data(n=60, nq=4, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    gnd = random_gnd(nq, n, rng, sizes=((1, 5), (1, 5), (0, 3)), empty_fraction=0)
    Q, X = clustered_descriptors(gnd, dim, rng)
    return gnd, Q, X


# ---------------------------------------------------------------------------------- zero rows
def test_zero_database_rows_are_named_with_count_and_first_rows():
    gnd, Q, X = _data()
    X[[3, 17, 40]] = 0
    with pytest.raises(RetrievalInputError) as err:
        search(Q, X, 10, chunk_size=16)  # the rows lie in three different chunks
    message = str(err.value)
    assert message.startswith("X (database descriptors) has 3 all-zero rows (first at rows 3, 17, 40)")
    assert "failed extraction" in message and "R1MDescriptors.valid_indices" in message


def test_zero_query_rows_are_named():
    gnd, Q, X = _data()
    Q[2] = 0
    with pytest.raises(RetrievalInputError, match=r"Q \(query descriptors\) has 1 all-zero row \(first at row 2\)"):
        search(Q, X, 5)


def test_zero_rows_in_an_fp16_memmap_found_by_the_evaluation_pass(tmp_path):
    gnd, Q, X = _data(n=300)
    path = tmp_path / "X.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=tuple(X.shape))
    arr[:] = X.numpy().astype(np.float16)
    arr[[5, 6, 7, 8, 9, 250, 299]] = 0
    arr.flush()
    X_map = np.load(path, mmap_mode="r")
    with pytest.raises(RetrievalInputError, match=r"X \(database descriptors\) has 7 all-zero rows "
                                                  r"\(first at rows 5, 6, 7, 8, 9\)"):
        evaluate_descriptors(Q, X_map, gnd, rerank=False, chunk_size=64)
    with pytest.raises(RetrievalInputError, match="has 7 all-zero rows"):
        search_with_tail(Q, X_map, 10, gnd, chunk_size=64)
    idx, _ = search(Q, np.ascontiguousarray(X.numpy()), 10)
    with pytest.raises(RetrievalInputError, match="has 7 all-zero rows"):
        tail_positions(Q, X_map, idx, gnd, chunk_size=64)


def test_orthogonal_rows_scoring_zero_are_not_mistaken_for_zero_rows():
    gnd, Q, X = _data(n=20, dim=8)
    Q = torch.zeros(4, 8)
    Q[:, 0] = 1.0
    X = torch.eye(8).repeat(3, 1)[:20]  # most rows score exactly 0 against every query
    idx, scores = search(Q, X, 20)
    assert idx.shape == (4, 20)


def test_rerank_refuses_zero_rows_in_the_top_m():
    gnd, Q, X = _data()
    idx, _ = search(Q, X, 30)
    bad = X.clone()
    bad[int(idx[1, 4])] = 0
    with pytest.raises(RetrievalInputError, match=rf"has 1 all-zero row \(first at row {int(idx[1, 4])}\)"):
        superglobal_rerank(Q, bad, idx, M=20, K=3)


def test_r1m_rows_without_a_descriptor_are_left_out_by_evaluate(tmp_path):
    """evaluate.py adds only R1M's valid rows; the full memmap (zero rows included) is refused."""
    gnd, Q, X = _data(n=40)
    rng = np.random.default_rng(1)
    r1m_rows = random_unit(30, X.shape[1], rng).numpy().astype(np.float16)
    valid = np.ones(30, dtype=bool)
    valid[[0, 13]] = False
    r1m_rows[~valid] = 0  # as r1m_extraction stores listed-but-missing images
    r1m = SimpleNamespace(descriptors=r1m_rows, valid_indices=np.flatnonzero(valid))
    combined = evaluate_cli.with_distractors(X, r1m, tmp_path / "database+r1m.npy")
    assert combined.shape == (68, X.shape[1])
    res = evaluate_descriptors(Q, combined, gnd["gnd"], M=20, K=3)
    assert set(res["rerank_mAP"]) == {"E", "M", "H"}
    everything = np.concatenate([X.numpy().astype(np.float16), r1m_rows])
    with pytest.raises(RetrievalInputError, match=r"has 2 all-zero rows \(first at rows 40, 53\)"):
        evaluate_descriptors(Q, everything, gnd["gnd"], M=20, K=3)


def test_faiss_flat_refuses_zero_rows():
    pytest.importorskip("faiss")
    from sg_train.retrieval import faiss_search

    gnd, Q, X = _data()
    X[[1, 2]] = 0
    with pytest.raises(RetrievalInputError, match=r"has 2 all-zero rows \(first at rows 1, 2\)"):
        faiss_search(Q, X, 5, index="flat", use_gpu=False)


# ------------------------------------------------------------------------------- rerank params
def test_k_larger_than_the_database_names_sizes_and_fix():
    with pytest.raises(RetrievalInputError) as err:
        check_rerank_params(8, 400, 9, 0.15, what="rsynth")
    assert str(err.value) == ("reranking K=9 needs at least 10 database images (K neighbours plus the item itself); "
                              "rsynth has 8: lower K to at most 7")


@pytest.mark.parametrize(
    "args, message",
    [
        ((100, 5, 9, 0.15), r"M=5 is smaller than K\+1=10.*raise M to at least 10 or lower K to at most 4"),
        ((100, 400, 9, -0.1), r"beta must be a finite number >= 0 .*got -0.1"),
        ((100, 400, 9, float("nan")), r"beta must be a finite number >= 0"),
        ((100, "400", 9, 0.15), r"M must be an integer >= 1 .*got '400'"),
        ((100, 400, -1, 0.15), r"K must be an integer >= 0 .*got -1"),
        ((100, 400, True, 0.15), r"K must be an integer >= 0 .*got True"),
    ],
)
def test_bad_rerank_params(args, message):
    with pytest.raises(RetrievalInputError, match=message):
        check_rerank_params(*args)


def test_m_beyond_the_database_is_clamped_not_refused():
    check_rerank_params(10, 400, 9, 0.15)
    check_rerank_params(10, np.int64(400), np.int64(9), np.float32(0.0))
    gnd, Q, X = _data(n=12)
    res = evaluate_descriptors(Q, X, gnd, M=400, K=9)
    assert set(res["rerank_mAP"]) == {"E", "M", "H"}


def test_evaluate_descriptors_checks_rerank_params_before_searching(monkeypatch):
    import sg_train.retrieval.evaluation as evaluation

    def no_search(*args, **kwargs):
        raise AssertionError("searched before checking the reranking parameters")

    monkeypatch.setattr(evaluation, "search_with_tail", no_search)
    gnd, Q, X = _data(n=8)
    with pytest.raises(RetrievalInputError, match=r"K=9 needs at least 10 database images .*; the database has 8"):
        evaluate_descriptors(Q, X, gnd, rerank=True)


def test_evaluate_cli_descriptor_mode_refuses_a_small_database_before_the_search(tmp_path, monkeypatch, capsys):
    gnd, Q, X = _data(n=8)
    (tmp_path / "gnd_tiny.pkl").write_bytes(pickle.dumps(gnd))
    np.save(tmp_path / "Q.npy", Q.numpy())
    np.save(tmp_path / "X.npy", X.numpy())

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated before checking the reranking parameters")

    monkeypatch.setattr(evaluate_cli, "evaluate_sweep", no_evaluation)
    argv = ["--descriptors", str(tmp_path / "Q.npy"), str(tmp_path / "X.npy"), "--gnd", str(tmp_path / "gnd_tiny.pkl"),
            "--rerank"]
    assert evaluate_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"K=9 needs at least 10 database images (K neighbours plus the item itself); database descriptor file " \
           f"{tmp_path / 'X.npy'} has 8: lower K to at most 7" in err


def test_evaluate_cli_model_mode_refuses_a_small_database_before_any_extraction(synthetic_data, tmp_path, monkeypatch,
                                                                                capsys):
    from sg_train.module import LandmarkRetrievalModule

    module = LandmarkRetrievalModule(num_classes=3, backbone="resnet18", embedding_dim=8)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)

    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted before checking the reranking parameters")

    monkeypatch.setattr(evaluate_cli, "extract_all", no_extraction)
    argv = ["--checkpoint", str(ckpt), "--data-root", str(synthetic_data / "revisited"), "--datasets", "rsynth",
            "--device", "cpu", "--no-progress", "--rerank", "--K", "1000", "--M", "2000"]
    assert evaluate_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "reranking K=1000 needs at least 1001 database images" in err and "rsynth (" in err
