"""Empty, truncated or foreign checkpoint / weights / descriptor / ground-truth files: one catchable
error (a ValueError) that names the path, the size and what the file should be."""
from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sg_train.cvnet import load_cvnet_weights
from sg_train.finetune import load_finetune_weights
from sg_train.inference import model_from_checkpoint
from sg_train.model import EmbeddingModel
from sg_train.module import LandmarkRetrievalModule
from sg_train.retrieval import GroundTruthError, load_gnd
from sg_train.weights_io import WeightsFileError, WeightsMismatchError, read_lightning_checkpoint, read_state_dict

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("evaluate_cli_files", ROOT / "evaluate.py")
evaluate_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_cli)


def _empty(tmp_path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(b"")
    return path


def _truncated(tmp_path, name: str) -> Path:
    full = tmp_path / f"full_{name}"
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(64, 64)}}, full)
    data = full.read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    return path


def test_zero_byte_checkpoint_names_path_size_and_content(tmp_path):
    path = _empty(tmp_path, "last.ckpt")
    with pytest.raises(WeightsFileError) as err:
        read_lightning_checkpoint(path)
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert f"checkpoint {path} is empty (0 bytes)" in message
    assert "it should be a Lightning checkpoint (.ckpt) written by train.py" in message
    assert "copy or download it again" in message


def test_truncated_checkpoint_names_its_size(tmp_path):
    path = _truncated(tmp_path, "epoch=3.ckpt")
    size = path.stat().st_size
    with pytest.raises(WeightsFileError) as err:
        read_lightning_checkpoint(path)
    assert f"cannot read checkpoint {path} ({size:,} bytes) (" in str(err.value)
    assert "it should be a Lightning checkpoint" in str(err.value)


def test_init_from_and_evaluation_of_an_empty_checkpoint(tmp_path):
    path = _empty(tmp_path, "src.ckpt")
    module = LandmarkRetrievalModule(num_classes=2, backbone="resnet18", embedding_dim=8)
    with pytest.raises(WeightsFileError, match=r"empty \(0 bytes\)"):
        load_finetune_weights(module, path)
    with pytest.raises(WeightsFileError, match=r"empty \(0 bytes\)"):
        model_from_checkpoint(path)


def test_checkpoint_without_hyper_parameters_is_a_weights_file_error(tmp_path):
    path = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(WeightsFileError, match="no sg-train hyper-parameters"):
        model_from_checkpoint(path)


@pytest.mark.parametrize("name", ["resnet18.pth", "resnet18.safetensors"])
def test_zero_byte_pretrained_weights(tmp_path, name):
    path = _empty(tmp_path, name)
    with pytest.raises(WeightsFileError, match=rf"weights file {path} is empty \(0 bytes\); it should be"):
        EmbeddingModel("resnet18", "gem", 8, pretrained_weights=path)


def test_truncated_safetensors_names_path_and_size(tmp_path):
    from safetensors.torch import save_file

    full = tmp_path / "full.safetensors"
    save_file({"w": torch.zeros(256)}, str(full))
    path = tmp_path / "w.safetensors"
    path.write_bytes(full.read_bytes()[:100])
    with pytest.raises(WeightsFileError, match=rf"cannot read weights file {path} \(100 bytes\).*a \.safetensors file"):
        read_state_dict(path)


def test_git_lfs_pointer_is_recognised(tmp_path):
    path = tmp_path / "CVPR2022_CVNet_R50.pyth"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 98765432\n")
    with pytest.raises(WeightsFileError, match=r"CVNet weights file .* bytes\).*Git LFS pointer: run `git lfs pull`"):
        load_cvnet_weights(path, 50)


def test_zero_byte_cvnet_weights(tmp_path):
    path = _empty(tmp_path, "CVPR2022_CVNet_R101.pyth")
    with pytest.raises(WeightsFileError, match=rf"CVNet weights file {path} is empty \(0 bytes\)"):
        load_cvnet_weights(path, 101)


def test_weights_file_errors_stay_weights_mismatch_errors(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMismatchError, match=r"cannot read weights file .*junk.pth \(16 bytes\)"):
        read_state_dict(junk)


def test_zero_byte_descriptor_file_in_evaluate(tmp_path, capsys):
    gnd = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"bbx": None, "easy": [0], "hard": [], "junk": []}]}
    (tmp_path / "gnd_toy.pkl").write_bytes(pickle.dumps(gnd))
    q = _empty(tmp_path, "Q.npy")
    np.save(tmp_path / "X.npy", np.eye(2, dtype=np.float32))
    argv = ["--descriptors", str(q), str(tmp_path / "X.npy"), "--gnd", str(tmp_path / "gnd_toy.pkl")]
    assert evaluate_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"query descriptor file {q} is empty (0 bytes); it should be one 2-D float array written by" in err


def test_zero_byte_ground_truth(tmp_path):
    path = _empty(tmp_path, "gnd_roxford5k.pkl")
    with pytest.raises(GroundTruthError, match=rf"{path} is empty \(0 bytes\); it should be a Revisited ground-truth"):
        load_gnd(path)
