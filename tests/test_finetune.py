"""Fine-tuning from an sg-train checkpoint on another class set (init_from)."""
from __future__ import annotations

import pytest
import torch

from sg_train.finetune import load_finetune_weights, transfer_class_weights
from sg_train.module import LandmarkRetrievalModule
from sg_train.weights_io import WeightsFileError, check_exact_fit


def make(num_classes: int, **kwargs) -> LandmarkRetrievalModule:
    return LandmarkRetrievalModule(num_classes=num_classes, backbone="resnet18", embedding_dim=16, **kwargs)


def save_checkpoint(module: LandmarkRetrievalModule, path, landmark_ids: list[int]) -> None:
    torch.save({"state_dict": module.state_dict(), "GLDv2DataModule": {"landmark_ids": landmark_ids}}, path)


def test_embedding_model_loaded_and_shared_landmarks_copied_by_id(tmp_path):
    source = make(4)
    save_checkpoint(source, tmp_path / "src.ckpt", [10, 20, 30, 40])
    target = make(3)
    fresh_row = target.loss_fn.weight[1].detach().clone()
    report = load_finetune_weights(target, tmp_path / "src.ckpt", target_landmark_ids=[30, 99, 10])
    for name, value in source.model.state_dict().items():
        assert torch.equal(target.model.state_dict()[name], value), name
    weight = target.loss_fn.weight.detach()
    assert torch.equal(weight[0], source.loss_fn.weight[2].detach())  # landmark 30
    assert torch.equal(weight[2], source.loss_fn.weight[0].detach())  # landmark 10
    assert torch.equal(weight[1], fresh_row)  # landmark 99 keeps its own initialisation
    assert "2 of 3 classes copied" in report["class_weights"]


def test_same_classes_load_everything(tmp_path):
    source = make(4, loss="curricularface")
    source.loss_fn.t.fill_(0.25)
    save_checkpoint(source, tmp_path / "src.ckpt", [1, 2, 3, 4])
    target = make(4, loss="curricularface")
    report = load_finetune_weights(target, tmp_path / "src.ckpt", target_landmark_ids=[1, 2, 3, 4])
    assert report["class_weights"] == "class weights: all loaded"
    assert float(target.loss_fn.t) == 0.25
    assert torch.equal(target.loss_fn.weight, source.loss_fn.weight)


def test_a_checkpoint_of_another_architecture_is_refused_naming_keys(tmp_path):
    save_checkpoint(make(4), tmp_path / "src.ckpt", [1, 2, 3, 4])
    other = LandmarkRetrievalModule(num_classes=4, backbone="resnet18", embedding_dim=32)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"fc\.weight \(file \(16, 512\), model \(32, 512\)\)"):
        load_finetune_weights(other, tmp_path / "src.ckpt")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing half-loaded


def test_missing_and_non_lightning_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_finetune_weights(make(2), tmp_path / "nope.ckpt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(WeightsFileError, match="not a Lightning checkpoint"):
        load_finetune_weights(make(2), tmp_path / "plain.pt")


def test_check_exact_fit_lists_missing_and_unexpected():
    model = make(2).model
    state = dict(model.state_dict())
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing from the file: 1 key: fc\.bias.*not in the model: 1 key: extra\.weight"):
        check_exact_fit(model, state, "test")


def test_class_weights_without_ids_are_reinitialised():
    loss = make(3).loss_fn
    before = loss.weight.detach().clone()
    account = transfer_class_weights(loss, {"weight": torch.zeros(5, 16)}, None, [1, 2, 3])
    assert "re-initialised" in account
    assert torch.equal(loss.weight.detach(), before)
