"""python -m sg_train.mine_hard_negatives: a stage-1 checkpoint's top wrong classes for every training image.

A tiny stage-1 run (resnet18 at 64 px, one step on the generated GLDv2 layout) is mined once into a
reference folder; every other test compares against it or against a direct computation.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from child_env import ROOT, child_env
from torch import nn

import train
from datamodules.transforms import build_eval_transform
from sg_train import mine_hard_negatives as mining
from sg_train.hard_negatives import (
    HardNegativeWriter,
    data_fingerprint,
    load_hard_negatives,
    scoring_fingerprint,
    training_data_fingerprint,
)
from sg_train.image_io import read_image
from sg_train.losses import ArcFace, SubCenterArcFace
from sg_train.module import LandmarkRetrievalModule

TOP_N, CHUNK = 5, 16  # 58 training images: chunks of 16, 16, 16 and 10


def write_config(tmp: Path, gldv2: Path, **data_changes) -> Path:
    """configs/demo.yaml made tiny: generated GLDv2 data, resnet18 at 64 px, no logger, no retrieval callback."""
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(default_root_dir=str(tmp / "run"), max_epochs=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False)
    trainer["callbacks"] = [c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    trainer["callbacks"][0]["init_args"].update(monitor=None, filename="epoch{epoch}", every_n_epochs=1)
    config["model"].update(backbone="resnet18", embedding_dim=32)
    config["data"]["init_args"].update({"data_root": str(gldv2), "image_size": 64, "batch_size": 8, "num_workers": 0,
                                        "val_fraction": 0.2, **data_changes})
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, synthetic_data):
    """``(config, checkpoint)`` of a one-step stage-1 run."""
    tmp = tmp_path_factory.mktemp("stage1")
    config = write_config(tmp, synthetic_data / "gldv2")
    train.main(["fit", "--config", str(config), "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"])
    return config, tmp / "run" / "checkpoints" / "last.ckpt"


def argv(config: Path, checkpoint: Path, out: Path, *more: str) -> list[str]:
    return ["--config", str(config), "--checkpoint", str(checkpoint), "--out", str(out), "--top-n", str(TOP_N),
            "--chunk-size", str(CHUNK), "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--no-progress",
            *more]


def header(path: Path) -> dict:
    return json.loads((path / "hard_negatives.json").read_text())


def load(path: Path):
    h = header(path)
    return load_hard_negatives(path, model_fingerprint=h["model_fingerprint"], data_fingerprint=h["data_fingerprint"])


@pytest.fixture(scope="module")
def reference(stage1, tmp_path_factory):
    """The folder one uninterrupted run mines (with a DataLoader worker)."""
    config, checkpoint = stage1
    out = tmp_path_factory.mktemp("reference") / "hn"
    args = argv(config, checkpoint, out)
    args[args.index("--num-workers") + 1] = "1"
    assert mining.main(args) == 0
    return out


@pytest.fixture(scope="module")
def training(stage1):
    """The stage-1 module and the datamodule (set up for fit) as a stage-2 run would have them:
    Lightning's own loader of the checkpoint, train.py's parser for the data."""
    config, checkpoint = stage1
    module = LandmarkRetrievalModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    cli = train.main(["--config", str(config), f"--trainer.default_root_dir={config.parent / 'stage2'}"], run=False)
    datamodule = cli.datamodule
    datamodule.setup("fit")
    return module, datamodule


def mined_chunks(monkeypatch) -> list[int]:
    """The chunks written from now on (HardNegativeWriter.write_chunk spied)."""
    written: list[int] = []
    original = HardNegativeWriter.write_chunk

    def spy(self, chunk, *args, **kwargs):
        written.append(chunk)
        return original(self, chunk, *args, **kwargs)

    monkeypatch.setattr(HardNegativeWriter, "write_chunk", spy)
    return written


def assert_same(path: Path, reference: Path) -> None:
    ours, theirs = load(path), load(reference)
    for name in ("wrong_classes", "scores", "predicted"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name), err_msg=name)


# ---------------------------------------------------------------------------- what is mined
def test_every_training_image_once_with_its_top_wrong_classes_highest_first(reference, training):
    _, datamodule = training
    labels = datamodule.train_dataset.labels
    hn = load(reference)
    assert hn.num_images == len(labels) == 58 and hn.wrong_classes.shape == (58, TOP_N)
    assert header(reference)["chunks"] == 4 and header(reference)["num_classes"] == datamodule.num_classes == 12
    assert (hn.wrong_classes != labels[:, None]).all()
    assert ((hn.wrong_classes >= 0) & (hn.wrong_classes < 12)).all() and not hn.unreadable.any()
    assert all(len(set(row)) == TOP_N for row in hn.wrong_classes.tolist())
    assert (np.diff(hn.scores, axis=1) <= 0).all() and np.isfinite(hn.scores).all()
    wrong = hn.misclassified(labels)  # a misclassified image's top-1 class is its most confusable wrong class
    np.testing.assert_array_equal(hn.predicted[wrong], hn.wrong_classes[wrong, 0])
    assert ((hn.predicted >= 0) & (hn.predicted < 12)).all()
    assert (reference / "unreadable.tsv").read_text() == "index\tpath\treason\n"


def test_scores_are_the_cosine_of_the_embedding_and_the_class_weight(reference, training):
    """Recomputed image by image from the definition: the eval pipeline at the training size, the
    model's L2-normalised embedding, every class weight L2-normalised, in float64."""
    module, datamodule = training
    dataset = datamodule.train_dataset
    transform = build_eval_transform(64, pad_to_square=True, mean=module.model.mean, std=module.model.std,
                                     input_format=module.model.input_format)
    weights = F.normalize(module.loss_fn.weight.detach().double(), dim=1)
    hn = load(reference)
    for i in (0, 17, 40, 57):
        image = transform(image=read_image(dataset.path(i)))["image"][None]
        with torch.no_grad():
            embedding = module.model(image).double()
        cosine = (F.normalize(embedding, dim=1) @ weights.T)[0].numpy()
        own = dataset.labels[i]
        order = [c for c in np.argsort(-cosine, kind="stable") if c != own][:TOP_N]
        np.testing.assert_array_equal(hn.wrong_classes[i], order)
        np.testing.assert_allclose(hn.scores[i], cosine[order], atol=1e-5)
        assert hn.predicted[i] == int(np.argmax(cosine))


def test_score_batch_on_hand_made_cosines():
    """Embeddings given directly (an identity model): cosines by hand, own class left out, sub-centres by max."""

    class Identity(nn.Module):
        def __init__(self, loss_fn):
            super().__init__()
            self.loss_fn = loss_fn

        def forward(self, x):
            return x

    arcface = ArcFace(2, 4, s=1.0, m=0.1)
    with torch.no_grad():
        arcface.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-3.0, -1.0]]))
    e = torch.tensor([[1.0, 0.0], [0.0, 5.0]])  # cosines [1, 0, r, -3/√10] and [0, 1, r, -1/√10]
    wrong, scores, predicted = mining.score_batch(Identity(arcface), e, torch.tensor([0, 2]), 3)
    r, t = 2 ** -0.5, 10 ** -0.5
    assert wrong.tolist() == [[2, 1, 3], [1, 0, 3]] and predicted.tolist() == [0, 1]
    torch.testing.assert_close(scores, torch.tensor([[r, 0.0, -3 * t], [1.0, 0.0, -t]]))
    subcenter = SubCenterArcFace(2, 2, k=2, s=1.0, m=0.1)  # class 0: centres (1, 0), (0, 1); class 1: (-1, 0), (1, 1)
    with torch.no_grad():
        subcenter.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]]))
    wrong, scores, predicted = mining.score_batch(Identity(subcenter), torch.tensor([[0.0, 1.0]]), torch.tensor([0]), 1)
    assert wrong.tolist() == [[1]] and predicted.tolist() == [0]
    torch.testing.assert_close(scores, torch.tensor([[r]]))


# ---------------------------------------------------------------------------- fingerprints
def test_the_fingerprints_stage_2_recomputes_match_the_header(reference, training):
    module, datamodule = training
    h = header(reference)
    assert scoring_fingerprint(module.model, module.loss_fn) == h["model_fingerprint"]
    assert training_data_fingerprint(datamodule) == h["data_fingerprint"]
    load_hard_negatives(reference, model_fingerprint=scoring_fingerprint(module.model, module.loss_fn),
                        data_fingerprint=training_data_fingerprint(datamodule))
    other_scales = LandmarkRetrievalModule.load_from_checkpoint(  # another memory format, train mode, and the
        h["extra"]["checkpoint"], map_location="cpu", channels_last=False,  # extraction scales init_from leaves free
        model_options={"scales": [0.7071, 1.0, 1.4142]}).train()
    assert other_scales.model.scales != module.model.scales
    assert scoring_fingerprint(other_scales.model, other_scales.loss_fn) == h["model_fingerprint"]
    assert "data.image_size=64" in h["score"] and h["command"].startswith("python -m sg_train.mine_hard_negatives")


def test_the_fingerprints_change_with_any_weight_or_training_image(training):
    module, datamodule = training
    before = scoring_fingerprint(module.model, module.loss_fn)
    for parameter in (module.loss_fn.weight, next(module.model.parameters())):
        with torch.no_grad():
            parameter.view(-1)[0] += 1e-3
        assert scoring_fingerprint(module.model, module.loss_fn) != before
        with torch.no_grad():
            parameter.view(-1)[0] -= 1e-3
    assert scoring_fingerprint(module.model, module.loss_fn) == before
    dataset = datamodule.train_dataset
    names, labels, ids = dataset.names, dataset.labels, datamodule.landmark_ids
    same = data_fingerprint(names, labels, num_classes=12, class_ids=ids)
    assert same == training_data_fingerprint(datamodule)
    as_strings = [n.decode() for n in names.tolist()]  # a list of str: the same digest as the dataset's bytes
    assert data_fingerprint(as_strings, labels.tolist(), num_classes=12, class_ids=ids) == same
    relabelled, renamed = labels.copy(), names.copy()
    relabelled[3] = (relabelled[3] + 1) % 12
    renamed[3] = b"x" + renamed[3][1:]
    assert len({same, data_fingerprint(names, relabelled, num_classes=12, class_ids=ids),
                data_fingerprint(renamed, labels, num_classes=12, class_ids=ids),
                data_fingerprint(names[:-1], labels[:-1], num_classes=12, class_ids=ids),
                data_fingerprint(names, labels, num_classes=12, class_ids=[*ids[:-1], 1]),
                data_fingerprint(names, labels, num_classes=13, class_ids=ids)}) == 6


# ---------------------------------------------------------------------------- resuming
def test_a_resumed_mining_mines_only_the_missing_chunk_and_gives_identical_arrays(stage1, reference, tmp_path,
                                                                                  monkeypatch):
    out = tmp_path / "hn"
    shutil.copytree(reference, out)
    for suffix in ("json", "npz"):
        (out / "chunks" / f"000002.{suffix}").unlink()
    written = mined_chunks(monkeypatch)
    assert mining.main(argv(*stage1, out)) == 0
    assert written == [2]
    assert_same(out, reference)
    assert (out / "chunks" / "000002.npz").read_bytes() == (reference / "chunks" / "000002.npz").read_bytes()
    assert mining.main(argv(*stage1, out)) == 0 and written == [2]  # finished: nothing mined again


def test_a_mining_killed_with_sigkill_resumes_with_the_missing_chunks(stage1, reference, tmp_path, monkeypatch):
    out = tmp_path / "hn"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from sg_train import mine_hard_negatives as mining
        from sg_train.hard_negatives import HardNegativeWriter
        write = HardNegativeWriter.write_chunk
        def write_then_die(self, chunk, *args, **kwargs):
            write(self, chunk, *args, **kwargs)
            if chunk == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        HardNegativeWriter.write_chunk = write_then_die
        sys.exit(mining.main({argv(*stage1, out)!r}))
    """)
    run = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert sorted(p.name for p in (out / "chunks").glob("*.json")) == ["000000.json", "000001.json"]
    written = mined_chunks(monkeypatch)
    assert mining.main(argv(*stage1, out)) == 0
    assert written == [2, 3]
    assert_same(out, reference)


# ---------------------------------------------------------------------------- DDP
def test_two_ranks_each_mine_their_chunks_and_give_the_single_process_result(stage1, reference, tmp_path,
                                                                            monkeypatch, capsys):
    """Two processes started by hand (RANK/WORLD_SIZE, no torchrun rendezvous), rank 1 first."""
    out = tmp_path / "hn"
    written = mined_chunks(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, chunks in ((1, [1, 3]), (0, [0, 2])):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert mining.main(argv(*stage1, out)) == 0
        assert written == chunks
        written.clear()
    printed = capsys.readouterr().out
    assert "rank 1 of 2: mined 2 chunks (26 images" in printed and "is not complete yet" in printed
    assert "rank 0 of 2: mined 2 chunks (32 images" in printed and "holds all 58 training images" in printed
    assert_same(out, reference)
    assert mining.main(argv(*stage1, out, "--overwrite")) == 1  # another process could be writing chunks
    assert "--overwrite with WORLD_SIZE=2 processes not started by torchrun" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_with_two_processes_gives_the_single_process_result(stage1, reference, tmp_path):
    out = tmp_path / "hn"
    (out / "chunks").mkdir(parents=True)
    shutil.copy(reference / "hard_negatives.json", out)  # --overwrite: rank 0 clears it before rank 1 opens it
    for name in ("000000.json", "000000.npz", "000003.json", "000003.npz"):
        shutil.copy(reference / "chunks" / name, out / "chunks")
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run([str(torchrun), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                          "--master_port", str(free_port()), "-m", "sg_train.mine_hard_negatives",
                          *argv(*stage1, out, "--overwrite")],
                         env=child_env(), capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"rank 0 of 2: mined 2 chunks \(32 images", run.stdout), run.stdout
    assert re.search(r"rank 1 of 2: mined 2 chunks \(26 images", run.stdout), run.stdout
    assert_same(out, reference)


# ---------------------------------------------------------------------------- refusals
def test_a_folder_of_another_checkpoint_or_data_set_is_refused_unless_overwrite(stage1, reference, synthetic_data,
                                                                                tmp_path, capsys):
    config, checkpoint = stage1
    other = torch.load(checkpoint, map_location="cpu", weights_only=False)
    other["state_dict"]["loss_fn.weight"][0, 0] += 0.5
    torch.save(other, tmp_path / "other.ckpt")
    out = tmp_path / "hn"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in (out / "chunks").iterdir()}
    assert mining.main(argv(config, tmp_path / "other.ckpt", out)) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"python -m sg_train.mine_hard_negatives: error: \S+hn holds hard negatives mined with another "
                        r"model \(model_fingerprint \w{12}, now \w{12}\); choose another folder, or pass --overwrite "
                        r"to replace it", error), error
    assert {p.name: p.read_bytes() for p in (out / "chunks").iterdir()} == before  # nothing lost
    shutil.copytree(synthetic_data / "gldv2", tmp_path / "gldv2")  # its split file is written beside the data
    more_held_out = write_config(tmp_path, tmp_path / "gldv2", val_fraction=0.3)  # the same classes, fewer images
    assert mining.main(argv(more_held_out, checkpoint, out)) == 1
    assert "mined with another data set" in capsys.readouterr().err
    assert mining.main(argv(config, tmp_path / "other.ckpt", out, "--overwrite")) == 0
    assert header(out)["model_fingerprint"] != header(reference)["model_fingerprint"]
    assert header(out)["extra"]["checkpoint"] == str(tmp_path / "other.ckpt")


def test_a_checkpoint_of_other_classes_is_refused_naming_the_first_difference(stage1, tmp_path, capsys):
    config, checkpoint = stage1
    relabelled = torch.load(checkpoint, map_location="cpu", weights_only=False)
    true_id = relabelled["sg_train"]["landmark_ids"][3]
    relabelled["sg_train"]["landmark_ids"][3] = 999999
    torch.save(relabelled, tmp_path / "relabelled.ckpt")
    assert mining.main(argv(config, tmp_path / "relabelled.ckpt", tmp_path / "hn")) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "relabelled.ckpt was trained on other classes than the --config data" in error
    assert f"first difference at class 3: checkpoint 999999, data {true_id}" in error
    fewer = LandmarkRetrievalModule(num_classes=5, backbone="resnet18", head="gem+sgem", embedding_dim=32)
    torch.save({"state_dict": fewer.state_dict(), "hyper_parameters": dict(fewer.hparams)}, tmp_path / "five.ckpt")
    assert mining.main(argv(config, tmp_path / "five.ckpt", tmp_path / "hn")) == 1
    assert "five.ckpt was trained on other classes than the --config data: 5 classes, the data has 12" in \
        capsys.readouterr().err
    assert not (tmp_path / "hn").exists()


@pytest.mark.parametrize("change, message", [
    ({"--top-n": "12"}, r"--top-n 12 must be below the class count 12 .*pass --top-n 11 or less"),
    ({"--checkpoint": "missing.ckpt"}, r"--checkpoint \S*missing.ckpt not found: give the stage-1 checkpoint"),
    ({"--config": "missing.yaml"}, r"--config \S*missing.yaml not found: give the training configuration"),
    ({"--device": "cuda:7"} if not torch.cuda.is_available() else {"--device": "tpu"}, r"--device"),
])
def test_bad_options_end_in_one_line_naming_the_option(stage1, tmp_path, capsys, change, message):
    args = argv(*stage1, tmp_path / "hn")
    for option, value in change.items():
        args[args.index(option) + 1] = value if option in ("--top-n", "--device") else str(tmp_path / value)
    assert mining.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, err[-1]) and err[-1].startswith("python -m sg_train.mine_hard_negatives: error: ")


# ---------------------------------------------------------------------------- unreadable images
def test_an_unreadable_training_image_is_counted_listed_and_marked(stage1, reference, synthetic_data, tmp_path,
                                                                 capsys):
    shutil.copytree(synthetic_data / "gldv2", tmp_path / "gldv2")
    config = write_config(tmp_path, tmp_path / "gldv2")
    datamodule = mining.load_training_data(config)
    datamodule.setup("fit")
    broken = datamodule.train_dataset.path(20)
    Path(broken).write_bytes(b"not a jpeg")
    assert mining.main(argv(config, stage1[1], tmp_path / "hn")) == 0
    assert "mined 4 chunks (58 images, " in capsys.readouterr().out
    hn, good = load(tmp_path / "hn"), load(reference)
    np.testing.assert_array_equal(np.flatnonzero(hn.unreadable), [20])
    assert hn.predicted[20] == -1 and (hn.wrong_classes[20] == -1).all() and np.isnan(hn.scores[20]).all()
    assert not hn.misclassified(datamodule.train_dataset.labels)[20]
    keep = np.arange(58) != 20
    np.testing.assert_array_equal(hn.wrong_classes[keep], good.wrong_classes[keep])
    np.testing.assert_allclose(hn.scores[keep], good.scores[keep], atol=1e-6)
    lines = (tmp_path / "hn" / "unreadable.tsv").read_text().splitlines()
    assert lines[0] == "index\tpath\treason" and len(lines) == 2 and lines[1].startswith(f"20\t{broken}\t")
    record = json.loads((tmp_path / "hn" / "chunks" / "000001.json").read_text())
    assert [row[:2] for row in record["unreadable"]] == [[20, broken]]


def test_the_writer_takes_an_unreadable_row_only_whole(tmp_path):
    w = HardNegativeWriter(tmp_path / "hn", model_fingerprint="m", data_fingerprint="d", num_images=2, num_classes=4,
                           top_n=2, chunk_size=2)
    with pytest.raises(ValueError, match="its row must be all -1"):
        w.write_chunk(0, [[1, 2], [3, -1]], [[0.5, 0.1], [0.2, 0.0]], [0, -1])
    with pytest.raises(ValueError, match="predicted must lie"):
        w.write_chunk(0, [[1, 2], [-1, -1]], [[0.5, 0.1], [0.0, 0.0]], [0, -2])
    w.write_chunk(0, [[1, 2], [-1, -1]], [[0.5, 0.1], [0.0, 0.0]], [0, -1], record={"unreadable": [[1, "b.jpg", "x"]]})
    assert w.chunk_record(0)["unreadable"] == [[1, "b.jpg", "x"]] and w.chunk_record(0)["chunk"] == 0
    hn = load_hard_negatives(tmp_path / "hn", model_fingerprint="m", data_fingerprint="d")
    assert hn.unreadable.tolist() == [False, True] and hn.misclassified(np.array([1, 1])).tolist() == [True, False]
