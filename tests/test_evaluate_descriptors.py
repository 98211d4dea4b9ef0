"""evaluate.py --descriptors: the table, the JSON (equal to the API's numbers), and one clear
error line with a non-zero exit status for every bad input."""
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sg_train.retrieval import evaluate_descriptors, load_gnd

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "evaluate.py")
evaluate_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_cli)


def run_main(capsys, *argv):
    code = evaluate_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_equals_api_and_table_printed(files, tmp_path):
    out_json = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "evaluate.py", "--descriptors", files["Q"], files["X"], "--gnd",
                           files["gnd"], "--rerank", "--json", out_json], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["toyford", "E", "M", "H"] and "rerank" in lines[2]
    got = json.loads(out_json.read_text())
    api = evaluate_descriptors(np.load(files["Q"]), np.load(files["X"], mmap_mode="r"), load_gnd(files["gnd"]),
                               rerank=True)
    assert set(got) == {"toyford"}
    assert got["toyford"]["mAP"] == api["mAP"] and got["toyford"]["rerank_mAP"] == api["rerank_mAP"]
    assert got["toyford"]["mP"]["M"] == {str(k): v for k, v in api["mP"]["M"].items()}
    assert all(0 <= v <= 1 for v in got["toyford"]["mAP"].values())
    assert f"{100 * api['mAP']['M']:.2f}" in lines[1]


def test_without_rerank_and_with_faiss(files, tmp_path, capsys):
    out_json = tmp_path / "o.json"
    code, out, err = run_main(capsys, "--descriptors", files["Q"], files["X"], "--gnd", files["gnd"],
                              "--backend", "faiss", "--json", out_json)
    assert code == 0, err
    assert set(json.loads(out_json.read_text())["toyford"]) == {"mAP", "mP"}
    assert len(out.splitlines()) == 2


def _expect_error(capsys, argv, pattern):
    code, out, err = run_main(capsys, *argv)
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("evaluate.py: error: ")
    assert pattern in err, err


def test_missing_files(files, tmp_path, capsys):
    _expect_error(capsys, ["--descriptors", tmp_path / "nope.npy", files["X"], "--gnd", files["gnd"]],
                  "query descriptor file not found")
    _expect_error(capsys, ["--descriptors", files["Q"], files["X"], "--gnd", tmp_path / "gnd_x.pkl"],
                  "ground-truth file not found")


def test_bad_descriptors(files, tmp_path, capsys):
    Q = np.load(files["Q"])
    X = np.load(files["X"])
    bad = tmp_path / "bad.npy"
    cases = [
        (Q[:, :16], files["X"], "descriptor dimensions differ: Q is (12, 16) but X is (400, 32)"),
        (Q[:11], files["X"], "11 query descriptors but the ground truth has 12 queries"),
        (np.where(np.arange(12)[:, None] == 4, np.nan, Q), files["X"],
         "non-finite values (nan/inf) in Q, first at row 4"),
        (Q.astype(np.int64), files["X"], "must hold a 2-D float array"),
    ]
    for q_arr, x_path, pattern in cases:
        np.save(bad, q_arr)
        _expect_error(capsys, ["--descriptors", bad, x_path, "--gnd", files["gnd"]], pattern)
    X_bad = X.copy()
    X_bad[123, 0] = np.inf
    np.save(bad, X_bad)
    _expect_error(capsys, ["--descriptors", files["Q"], bad, "--gnd", files["gnd"]], "first at row 123")
    np.save(bad, X[:0])
    _expect_error(capsys, ["--descriptors", files["Q"], bad, "--gnd", files["gnd"]], "empty database")
    np.save(bad, X[:399])
    _expect_error(capsys, ["--descriptors", files["Q"], bad, "--gnd", files["gnd"]],
                  "399 database descriptors but the ground truth lists 400 images")
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, q=Q)
    _expect_error(capsys, ["--descriptors", bad_npz, files["X"], "--gnd", files["gnd"]], "not a single .npy array")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_ground_truth(files, tmp_path, capsys):
    gnd = pickle.loads(files["gnd"].read_bytes())
    gnd["gnd"][2]["junk"] = [7, 4000]
    path = tmp_path / "gnd_badidx.pkl"
    path.write_bytes(pickle.dumps(gnd))
    _expect_error(capsys, ["--descriptors", files["Q"], files["X"], "--gnd", path],
                  "gnd[2]['junk'] index 4000 is out of range for imlist of 400 images")
    marker = tmp_path / "pwned"
    gnd["gnd"][2]["junk"] = _Payload(marker)
    path.write_bytes(pickle.dumps(gnd))
    _expect_error(capsys, ["--descriptors", files["Q"], files["X"], "--gnd", path], "refusing to load global")
    assert not marker.exists()


def test_usage_errors(files, capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate_cli.main(["--descriptors", str(files["Q"]), str(files["X"])])
    assert exc.value.code == 2 and "--descriptors needs --gnd FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        evaluate_cli.main(["--gnd", str(files["gnd"])])
    assert exc.value.code == 2 and "--descriptors" in capsys.readouterr().err


def test_rows_that_are_not_unit_length_are_refused_naming_file_row_and_norm(files, tmp_path, capsys, monkeypatch):
    """X scaled by 7 kept the global mAP but changed SuperGlobal reranking (33.61 -> 26.48) silently."""
    def no_search(*args, **kwargs):
        raise AssertionError("searched before the rows were checked")

    monkeypatch.setattr(evaluate_cli, "evaluate_sweep", no_search)
    Q, X = np.load(files["Q"]), np.load(files["X"])
    bad = tmp_path / "bad.npy"
    np.save(bad, X * 7)  # fp16, as the fixture's database
    code, out, err = run_main(capsys, "--descriptors", files["Q"], bad, "--gnd", files["gnd"], "--rerank")
    assert code == 1 and err.count("\n") == 1
    norm = np.linalg.norm((X * 7)[0].astype(np.float64))  # 6.99963: fp16 rounds the product
    assert f"database descriptor file {bad}: row 0 has L2 norm {norm:.6g}, not 1" in err and "L2-normalise" in err
    X32 = X.astype(np.float32)
    X32[57] *= 1.002  # beyond fp32's 1e-3
    np.save(bad, X32)
    _expect_error(capsys, ["--descriptors", files["Q"], bad, "--gnd", files["gnd"]],
                  f"row 57 has L2 norm {np.linalg.norm(X32[57].astype(np.float64)):.6g}, not 1 (tolerance 0.001")
    Q2 = Q.copy()
    Q2[3] *= 0.5
    np.save(bad, Q2)
    _expect_error(capsys, ["--descriptors", bad, files["X"], "--gnd", files["gnd"]],
                  f"query descriptor file {bad}: row 3 has L2 norm 0.5")


def test_fp16_rounding_of_unit_rows_is_accepted(files, tmp_path, capsys):
    X = np.load(files["X"]).astype(np.float32)
    X[5] *= 1.004  # within fp16's looser tolerance
    path = tmp_path / "X16.npy"
    np.save(path, X.astype(np.float16))
    code, out, err = run_main(capsys, "--descriptors", files["Q"], path, "--gnd", files["gnd"])
    assert code == 0, err
