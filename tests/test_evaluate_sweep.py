"""evaluate.py grids: several --M/--K/--beta and αQE/αDBA values evaluated on the same descriptors,
each point equal to its own single run, every point checked before any work, αQE/αDBA as the
formulas say, and every point logged to one W&B run (and the W&B sweep config it ships)."""
from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb_records
import yaml
from test_retrieval_reference import clustered_descriptors, random_gnd, ref_revisited_map, ref_superglobal_rerank

import evaluate
from sg_train.module import LandmarkRetrievalModule

ROOT = Path(__file__).resolve().parents[1]
SWEEP_CONFIG = ROOT / "configs" / "sweeps" / "rerank.yaml"




def descriptor_args(files) -> list[str]:
    return ["--descriptors", str(files["Q"]), str(files["X"]), "--gnd", str(files["gnd"])]


def run_main(capsys, argv) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


GRID = {"M": [20, 400], "K": [3], "beta": [0.15], "qe_n": [0, 1, 2], "qe_alpha": [1.0, 3.0], "dba_n": [0, 3],
        "dba_alpha": [3.0]}


def grid_options(grid: dict) -> list[str]:
    return [a for name, values in grid.items() for a in (f"--{name.replace('_', '-')}", *map(str, values))]


def test_a_grid_equals_its_points_run_one_at_a_time(files, tmp_path, capsys):
    code, out, err = run_main(capsys, [*descriptor_args(files), "--rerank", *grid_options(GRID),
                                       "--json", tmp_path / "grid.json"])
    assert code == 0, err
    written = json.loads((tmp_path / "grid.json").read_text())
    assert written["format"] == "sg-train/sweep" and len(written["points"]) == 2 * 5 * 2  # αDBA, αQE (0: off), M
    for i, point in enumerate(written["points"]):
        params = point["params"]
        single = {name: [params[name]] for name in ("M", "K", "beta")}
        for name in ("qe", "dba"):
            if params[f"{name}_n"]:
                single.update({f"{name}_n": [params[f"{name}_n"]], f"{name}_alpha": [params[f"{name}_alpha"]]})
        assert run_main(capsys, [*descriptor_args(files), "--rerank", *grid_options(single),
                                 "--json", tmp_path / f"p{i}.json"])[0] == 0
        alone = json.loads((tmp_path / f"p{i}.json").read_text())
        for entry in alone.values():
            entry.pop("params", None)
        assert point["results"] == alone  # the same numbers to the last digit
    scores = [p["score"] for p in written["points"]]
    assert written["best"] == scores.index(max(scores))
    best_row = [line for line in out.splitlines() if line.startswith("  *")]
    assert len(best_row) == 1 and f"{100 * written['points'][written['best']]['score']:.2f}" in best_row[0]
    assert len([line for line in out.splitlines() if line[:5].strip() in ("", "*") and "." in line]) == 20


def test_model_mode_extracts_each_image_once_for_the_whole_grid(tiny_benchmark, tmp_path, capsys, monkeypatch):
    module = LandmarkRetrievalModule(num_classes=3, backbone="resnet18", head="gem", embedding_dim=16)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    extracted = []
    extract_all = evaluate.extract_all

    def counting(extractor, dataset, **kwargs):
        extracted.append((dataset.split, len(dataset)))
        return extract_all(extractor, dataset, **kwargs)

    monkeypatch.setattr(evaluate, "extract_all", counting)
    model_mode = ["--checkpoint", ckpt, "--scales", "1.0", "--data-root", tiny_benchmark, "--datasets", "rsynth",
                  "--device", "cpu", "--num-workers", "0", "--no-progress", "--rerank"]
    grid = ["--M", "5", "400", "--K", "1", "3", "--qe-n", "0", "2"]
    assert run_main(capsys, [*model_mode, *grid, "--json", tmp_path / "a.json"])[0] == 0
    assert extracted == [("query", 6), ("database", 15)]  # once each, for the 8 points
    first = json.loads((tmp_path / "a.json").read_text())["points"]
    assert len(first) == 8

    cached = [*model_mode, "--cache-dir", tmp_path / "cache", "--K", "2", "--M", "5", "400"]
    for name in ("b", "c"):  # descriptors from --cache-dir: extracted by the first run only
        assert run_main(capsys, [*cached, "--json", tmp_path / f"{name}.json"])[0] == 0
    assert extracted == [("query", 6), ("database", 15)] * 2
    second = json.loads((tmp_path / "c.json").read_text())["points"]
    assert [p["params"]["K"] for p in second] == [2, 2]
    assert second[0]["results"]["rsynth"]["mAP"] == first[0]["results"]["rsynth"]["mAP"]


def _expect_refused(capsys, argv, *patterns):
    code, _, err = run_main(capsys, argv)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("evaluate.py: error: "), err
    for pattern in patterns:
        assert pattern in err, err


def test_a_bad_value_in_any_point_is_refused_before_any_work(files, synthetic_data, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("worked before checking every point")

    monkeypatch.setattr(evaluate, "evaluate_sweep", no_work)
    monkeypatch.setattr(evaluate, "extract_all", no_work)
    x = files["X"]
    _expect_refused(capsys, [*descriptor_args(files), "--rerank", "--M", "400", "5", "--K", "3", "9"],
                    "--M 5 --K 9 --beta 0.15: reranking M=5 is smaller than K+1=10")
    _expect_refused(capsys, [*descriptor_args(files), "--rerank", "--beta", "0.15", "nan"],
                    "--beta nan:", "reranking beta must be a finite number >= 0", "got nan")
    _expect_refused(capsys, [*descriptor_args(files), "--qe-n", "2", "-1"],
                    "--qe-n -1 --qe-alpha 3.0: αQE n must be an integer >= 0", "got -1")
    _expect_refused(capsys, [*descriptor_args(files), "--dba-n", "2", "401"],
                    f"--dba-n 401 --dba-alpha 3.0: αDBA n=401 is larger than database descriptor file {x} "
                    "(400 images): lower it to at most 400")
    _expect_refused(capsys, [*descriptor_args(files), "--qe-n", "2", "--qe-alpha", "3", "inf"],
                    "--qe-alpha inf: αQE alpha must be a finite number >= 0", "got inf")

    module = LandmarkRetrievalModule(num_classes=3, backbone="resnet18", embedding_dim=8)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    model_mode = ["--checkpoint", ckpt, "--data-root", synthetic_data / "revisited", "--datasets", "rsynth",
                  "--device", "cpu", "--no-progress", "--rerank"]
    _expect_refused(capsys, [*model_mode, "--K", "9", "1000", "--M", "2000"],
                    "--M 2000 --K 1000 --beta 0.15: reranking K=1000 needs at least 1001 database images", "rsynth (")


def test_usage_errors_of_grids(files, capsys):
    for argv, message in ((["--M", "100", "400"], "several --M/--K/--beta values make a grid"),
                          (["--wandb-name", "x"], "need --wandb [PROJECT]")):
        with pytest.raises(SystemExit) as exc:
            evaluate.main([*descriptor_args(files), *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_alpha_dba_then_alpha_qe_then_rerank_follow_the_formulas(tmp_path, capsys):
    """A tiny benchmark computed by hand in float64: αDBA over the database, αQE from the first
    ranking against the augmented database, the search, then SuperGlobal reranking."""
    rng = np.random.default_rng(3)
    gnd = random_gnd(4, 30, rng, sizes=((2, 6), (2, 6), (1, 4)), empty_fraction=0.0)
    Q, X = (t.numpy() for t in clustered_descriptors(gnd, 8, rng, noise=2.0))
    for name, array in (("Q", Q), ("X", X)):
        np.save(tmp_path / f"{name}.npy", array)
    (tmp_path / "gnd_tiny.pkl").write_bytes(pickle.dumps(gnd))
    q, x = Q.astype(np.float64), X.astype(np.float64)
    dba_n, qe_n, alpha = 3, 2, 3.0

    S = x @ x.T
    x_dba = np.stack([sum(max(S[i, j], 0) ** alpha * x[j] for j in np.argsort(-S[i])[:dba_n]) for i in range(30)])
    x_dba = _unit(x_dba)
    first = np.argsort(-(q @ x_dba.T), axis=1)
    q_qe = _unit(np.stack([q[i] + sum(max(q[i] @ x_dba[j], 0) ** alpha * x_dba[j] for j in first[i, :qe_n])
                           for i in range(4)]))
    ranks = np.argsort(-(q_qe @ x_dba.T), axis=1)
    reranked = ref_superglobal_rerank(torch.from_numpy(q_qe), torch.from_numpy(x_dba), torch.from_numpy(ranks),
                                      M=10, K=2, beta=0.15).numpy()
    expected = {"mAP": ref_revisited_map(ranks, gnd["gnd"]), "rerank_mAP": ref_revisited_map(reranked, gnd["gnd"])}
    plain = ref_revisited_map(np.argsort(-(q @ x.T), axis=1), gnd["gnd"])
    assert any(plain[p]["mAP"] != expected["mAP"][p]["mAP"] for p in "EMH")  # αQE/αDBA change this ranking

    argv = ["--descriptors", tmp_path / "Q.npy", tmp_path / "X.npy", "--gnd", tmp_path / "gnd_tiny.pkl",
            "--dba-n", dba_n, "--dba-alpha", alpha, "--qe-n", qe_n, "--qe-alpha", alpha,
            "--rerank", "--M", "10", "--K", "2", "--json", tmp_path / "out.json"]
    code, out, err = run_main(capsys, argv)
    assert code == 0, err
    assert out.splitlines()[0] == "before the search: αDBA (n=3, alpha=3), then αQE (n=2, alpha=3)"
    written = json.loads((tmp_path / "out.json").read_text())["tiny"]
    assert written["params"] == {"dba_n": 3, "dba_alpha": 3.0, "qe_n": 2, "qe_alpha": 3.0, "M": 10, "K": 2,
                                 "beta": 0.15}
    for key in ("mAP", "rerank_mAP"):
        assert written[key] == pytest.approx({p: expected[key][p]["mAP"] for p in "EMH"}, abs=1e-12)


def test_every_point_is_one_row_of_one_wandb_run(files, tmp_path, capsys, monkeypatch, wandb_env):
    # WANDB_RUN_ID as a W&B sweep agent sets it: the run joins it
    wandb_env(WANDB_DIR=str(tmp_path / "wandb_home"), WANDB_RUN_ID="sweeprun1")
    (tmp_path / "wandb_home").mkdir()
    grid = {"M": [20, 400], "K": [3, 9], "beta": [0.15], "qe_n": [0, 2]}
    code, _, err = run_main(capsys, [*descriptor_args(files), "--rerank", *grid_options(grid),
                                       "--json", tmp_path / "grid.json", "--wandb", "sg-sweep-test",
                                       "--wandb-name", "rerank grid"])
    assert code == 0, err
    path = wandb_records.run_file(tmp_path / "wandb_home")
    assert path.name == "run-sweeprun1.wandb"
    written = json.loads((tmp_path / "grid.json").read_text())
    rows = wandb_records.history(path)
    assert len(rows) == len(written["points"]) == 8
    for i, (row, point) in enumerate(zip(rows, written["points"])):
        params = {k: v for k, v in point["params"].items() if v is not None}
        assert {k[len("sweep/"):]: row[k] for k in row if k.startswith("sweep/") and "toyford" not in k} == \
            {"point": i, **params, "score": point["score"]}
        result = point["results"]["toyford"]
        assert {k: row[f"sweep/toyford/{k}"] for k in ("mAP_M", "rerank_mAP_H")} == \
            {"mAP_M": result["mAP"]["M"], "rerank_mAP_H": result["rerank_mAP"]["H"]}
    config = wandb_records.config(path)
    assert config["grid"] == {"dba_n": [0], "dba_alpha": [3.0], **grid, "qe_alpha": [3.0]}
    assert config["source"]["descriptors"] == [str(files["Q"]), str(files["X"])] and config["datasets"] == ["toyford"]
    summary = wandb_records.summary(path)
    best = written["points"][written["best"]]
    assert summary["best/point"] == written["best"] and summary["best/score"] == best["score"]
    assert summary["best/M"] == best["params"]["M"] and summary["best/K"] == best["params"]["K"]
    assert summary["best/toyford/rerank_mAP_M"] == best["results"]["toyford"]["rerank_mAP"]["M"]
    assert summary["sweep/points"]["_type"] == "table-file"
    (table,) = path.parent.glob("files/media/table/sweep/points_*.table.json")
    assert len(json.loads(table.read_text())["data"]) == 8
    assert yaml.safe_load(SWEEP_CONFIG.read_text())["metric"]["name"] in summary  # what the shipped sweep optimises


def test_the_wandb_sweep_config_runs_evaluate_with_options_it_accepts():
    sweep = yaml.safe_load(SWEEP_CONFIG.read_text())
    assert sweep["program"] == "evaluate.py" and (ROOT / sweep["program"]).is_file()
    command = sweep["command"]
    assert command[:3] == ["${env}", "${interpreter}", "${program}"] and command[-1] == "${args}"
    fixed = command[3:-1]
    parser = evaluate.build_parser()
    for values in itertools.product(*(spec["values"] for spec in sweep["parameters"].values())):
        point = dict(zip(sweep["parameters"], values))
        args = parser.parse_args([*fixed, *(f"--{name}={value}" for name, value in point.items())])  # the agent's form
        assert {name: getattr(args, name) for name in point} == {name: [value] for name, value in point.items()}
        assert args.rerank and args.wandb == "" and len(evaluate.grid_points(args)) == 1
