"""evaluate.py model mode: sg-train checkpoints and CVNet weights on a Revisited-format benchmark."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import evaluate
from datamodules.revisited import RevisitedDataset
from sg_train.cvnet import expected_pycls_keys, pycls_to_timm_key
from sg_train.extraction import extract_all
from sg_train.inference import model_from_checkpoint, superglobal_head
from sg_train.module import LandmarkRetrievalModule
from sg_train.retrieval import evaluate_descriptors
from sg_train.synthetic import generate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    module = LandmarkRetrievalModule(num_classes=5, backbone="resnet18", head="gem+sgem", embedding_dim=32)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def common_args(data, out):
    return ["--data-root", str(data / "revisited"), "--datasets", "rsynth", "--device", "cpu", "--num-workers", "0",
            "--batch-size", "8", "--no-progress", "--rerank", "--json", str(out)]


def test_checkpoint_mode_json_equals_the_api_on_the_same_model(checkpoint, synthetic_data, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert evaluate.main(["--checkpoint", str(checkpoint), "--scales", "0.7071", "1.0", *common_args(synthetic_data, out)]) == 0
    written = json.loads(out.read_text())["rsynth"]
    model = model_from_checkpoint(checkpoint, scales=(0.7071, 1.0))
    kwargs = {"mean": model.mean, "std": model.std, "input_format": model.input_format}
    queries = RevisitedDataset(synthetic_data / "revisited", "rsynth", "query", **kwargs)
    database = RevisitedDataset(synthetic_data / "revisited", "rsynth", "database", **kwargs)
    Q = extract_all(model, queries, scales=(0.7071, 1.0), progress=False)
    X = extract_all(model, database, scales=(0.7071, 1.0), progress=False)
    expected = evaluate_descriptors(Q, X, queries.gnd, rerank=True)
    assert written["mAP"] == pytest.approx(expected["mAP"], abs=1e-12)
    assert written["rerank_mAP"] == pytest.approx(expected["rerank_mAP"], abs=1e-12)
    assert "rsynth" in capsys.readouterr().out  # the table


def test_descriptor_cache_is_reused(checkpoint, synthetic_data, tmp_path, monkeypatch):
    args = ["--checkpoint", str(checkpoint), "--scales", "1.0", "--cache-dir", str(tmp_path / "cache"),
            *common_args(synthetic_data, tmp_path / "a.json")]
    assert evaluate.main(args) == 0
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # queries and database

    def no_extraction(*args, **kwargs):
        raise AssertionError("descriptors were extracted again")

    monkeypatch.setattr(evaluate, "extract_all", no_extraction)
    args[args.index(str(tmp_path / "a.json"))] = str(tmp_path / "b.json")
    assert evaluate.main(args) == 0
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())


def test_head_switches_compose_superglobal():
    assert superglobal_head("gem", rgem=True, gemp=True, sgem=True) == "rgem+gemp+sgem"
    assert superglobal_head("gem+sgem") == "gem+sgem"
    assert superglobal_head("rgem+gem", gemp=True) == "rgem+gemp"


def test_gemp_switch_leaves_trained_gem_p_unused_but_loads_everything_else(checkpoint):
    model = model_from_checkpoint(checkpoint, rgem=True, gemp=True, relu_plus=True)
    assert str(model.head.spec) == "rgem+gemp+sgem"
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert torch.equal(model.fc.weight, saved["model.fc.weight"])


def test_checkpoint_without_the_expected_keys_is_refused(checkpoint, synthetic_data, tmp_path, capsys):
    saved = torch.load(checkpoint, weights_only=False)
    del saved["state_dict"]["model.fc.bias"]
    broken = tmp_path / "broken.ckpt"
    torch.save(saved, broken)
    assert evaluate.main(["--checkpoint", str(broken), *common_args(synthetic_data, tmp_path / "x.json")]) == 1
    assert "missing from the file: 1 key: fc.bias" in capsys.readouterr().err
    torch.save({"state_dict": {}}, broken)
    assert evaluate.main(["--checkpoint", str(broken), *common_args(synthetic_data, tmp_path / "x.json")]) == 1
    assert "hyper-parameters" in capsys.readouterr().err


def random_cvnet_checkpoint(path, depth=50):
    timm_state = timm.create_model(f"resnet{depth}", pretrained=False, num_classes=0).state_dict()
    state = {}
    for key in expected_pycls_keys(depth):
        target = timm_state[pycls_to_timm_key(key)]
        if key.endswith("running_var"):
            state[f"encoder_q.{key}"] = torch.rand_like(target) + 0.5
        elif target.is_floating_point():
            state[f"encoder_q.{key}"] = torch.randn_like(target) * 0.05
        else:
            state[f"encoder_q.{key}"] = target.clone()
    state["encoder_q.head.fc.weight"] = torch.randn(2048, 2048) * 0.02
    state["encoder_q.head.fc.bias"] = torch.zeros(2048)
    state["encoder_q.head.pool.p"] = torch.tensor([3.0])
    torch.save({"model_state": state}, path)


def test_cvnet_weights_mode_with_superglobal_switches_and_wrong_depth(synthetic_data, tmp_path, capsys):
    weights = tmp_path / "cvnet_r50.pyth"
    random_cvnet_checkpoint(weights)
    out = tmp_path / "cvnet.json"
    args = ["--cvnet-weights", str(weights), "--scales", "1.0", "--relu-plus", "--rgem", "--gemp", "--sgem",
            *common_args(synthetic_data, out)]
    assert evaluate.main(["--depth", "50", *args]) == 0
    result = json.loads(out.read_text())["rsynth"]
    assert set(result["mAP"]) == set("EMH") and all(0 <= v <= 1 for v in result["rerank_mAP"].values())
    assert evaluate.main(["--depth", "101", *args]) == 1
    assert "s3.b7" in capsys.readouterr().err


def test_r1m_distractors_are_added_and_never_raise_map(checkpoint, tmp_path):
    data = tmp_path / "data"
    generate(data, train_landmarks=2, views_per_landmark=2, bench_landmarks=3, bench_positives=3,
             bench_distractors=4, r1m_distractors=30, image_size=48, progress=False)
    (data / "revisitop1m" / "jpg").joinpath(
        (data / "revisitop1m" / "revisitop1m.txt").read_text().splitlines()[0]).unlink()  # listed but missing
    out = tmp_path / "r1m.json"
    args = ["--checkpoint", str(checkpoint), "--scales", "1.0", "--r1m", str(data / "revisitop1m"),
            "--r1m-out", str(tmp_path / "r1m_desc"), "--data-root", str(data / "revisited"), "--datasets", "rsynth",
            "--device", "cpu", "--num-workers", "0", "--no-progress", "--json", str(out)]
    with pytest.warns(UserWarning, match="missing"):
        assert evaluate.main(args) == 0
    results = json.loads(out.read_text())
    for protocol in "EMH":
        assert results["rsynth+r1m"]["mAP"][protocol] <= results["rsynth"]["mAP"][protocol] + 1e-12
    assert not list((tmp_path / "r1m_desc").glob("*/database+r1m.npy"))  # the combined copy is gone


def test_examples_dir_draws_each_dataset_and_refuses_what_it_cannot_draw(checkpoint, synthetic_data, tmp_path, capsys,
                                                                         monkeypatch):
    out = tmp_path / "out.json"
    shown = tmp_path / "examples"
    argv = ["--checkpoint", str(checkpoint), "--scales", "1.0", *common_args(synthetic_data, out), "--M", "20", "--K", "3"]
    assert evaluate.main([*argv, "--examples-dir", str(shown), "--examples", "2", "--examples-k", "3"]) == 0
    assert f"wrote {shown / 'rsynth.png'}" in capsys.readouterr().out
    from PIL import Image

    with Image.open(shown / "rsynth.png") as image:  # 2 queries x (global + reranked) rows of 96 px
        assert image.format == "PNG" and image.height > 4 * 96 and image.width > 4 * 96
    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted before checking --examples-dir")

    monkeypatch.setattr(evaluate, "extract_all", no_extraction)
    (tmp_path / "a_file").write_text("")
    assert evaluate.main([*argv, "--examples-dir", str(tmp_path / "a_file" / "examples")]) == 1
    assert f"--examples-dir {tmp_path / 'a_file' / 'examples'} is inside" in capsys.readouterr().err
    for extra, message in ((["--M", "20", "40"], "draws one setting"), (["--qe-n", "2"], "draws one setting"),
                           (["--examples", "0"], "must be >= 1")):
        with pytest.raises(SystemExit):
            evaluate.main([*argv, "--examples-dir", str(shown), *extra])
        assert message in capsys.readouterr().err
