"""Fine-tuning (init_from) from an sg-train or CVNet checkpoint on another class set: class weights
by name, by landmark id only when asked, never by position."""
from __future__ import annotations

import pytest
import torch

from sg_train.cvnet import CVNET_MEAN_BGR, CVNET_STD_BGR, expected_pycls_keys, pycls_to_timm_key
from sg_train.errors import OptionError
from sg_train.finetune import load_finetune_weights, transfer_class_weights
from sg_train.module import LandmarkRetrievalModule
from sg_train.weights_io import WeightsFileError, check_exact_fit, write_checkpoint_record


def make(num_classes: int, **kwargs) -> LandmarkRetrievalModule:
    return LandmarkRetrievalModule(num_classes=num_classes, backbone="resnet18", embedding_dim=16, **kwargs)


def save_checkpoint(module: LandmarkRetrievalModule, path, landmark_ids: list[int] | None = None,
                    class_names: list[str] | None = None) -> None:
    checkpoint = {"state_dict": module.state_dict(), "GLDv2DataModule": {"landmark_ids": landmark_ids}}
    if class_names is not None:
        write_checkpoint_record(checkpoint, model_config=module.model.config, landmark_ids=landmark_ids,
                                class_names=class_names, protocol=None)
    torch.save(checkpoint, path)


def test_embedding_model_loaded_and_shared_landmarks_copied_by_id(tmp_path):
    source = make(4)
    save_checkpoint(source, tmp_path / "src.ckpt", [10, 20, 30, 40])
    target = make(3)
    fresh_row = target.loss_fn.weight[1].detach().clone()
    report = load_finetune_weights(target, tmp_path / "src.ckpt", target_landmark_ids=[30, 99, 10],
                                   class_transfer="landmark_id")
    for name, value in source.model.state_dict().items():
        assert torch.equal(target.model.state_dict()[name], value), name
    weight = target.loss_fn.weight.detach()
    assert torch.equal(weight[0], source.loss_fn.weight[2].detach())  # landmark 30
    assert torch.equal(weight[2], source.loss_fn.weight[0].detach())  # landmark 10
    assert torch.equal(weight[1], fresh_row)  # landmark 99 keeps its own initialisation
    assert "2 of 3 classes copied by landmark ids (30, 10); 1 new, initialised fresh (99)" in report["class_weights"]
    assert report["copied"] == [30, 10] and report["new"] == [99]


def test_same_classes_load_everything(tmp_path):
    source = make(4, loss="curricularface")
    source.loss_fn.t.fill_(0.25)
    save_checkpoint(source, tmp_path / "src.ckpt", [1, 2, 3, 4])
    target = make(4, loss="curricularface")
    report = load_finetune_weights(target, tmp_path / "src.ckpt", target_landmark_ids=[1, 2, 3, 4],
                                   class_transfer="landmark_id")
    assert report["class_weights"] == "class weights: all 4 classes loaded (the same landmark ids)"
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


def test_class_weights_without_names_are_initialised_fresh_and_landmark_ids_asked_for_must_exist():
    loss = make(3).loss_fn
    before = loss.weight.detach().clone()
    account = transfer_class_weights(loss, {"weight": torch.zeros(5, 16)}, None, ["a", "b", "c"], by="name")["account"]
    assert "initialised fresh; the checkpoint has no class names" in account
    assert torch.equal(loss.weight.detach(), before)
    for source, target, side in (([1, 2, 3, 4, 5], None, "this run's data has"), (None, [1, 2, 3], "the checkpoint has")):
        with pytest.raises(OptionError, match=f"class_transfer=landmark_id, but {side} no GLDv2 landmark ids.*=name"):
            transfer_class_weights(loss, {"weight": torch.zeros(5, 16)}, source, target, by="landmark_id")


def test_class_names_match_as_the_data_check_compares_them():
    loss = make(3).loss_fn
    source = torch.randn(2, 16)
    result = transfer_class_weights(loss, {"weight": source}, ["Ho\u0302tel de Ville", "Big Ben"],
                                    ["big ben", "hôtel de ville", "Louvre"], by="name")
    assert result["copied"] == ["big ben", "hôtel de ville"] and result["new"] == ["Louvre"]
    assert torch.equal(loss.weight.detach()[0], source[1]) and torch.equal(loss.weight.detach()[1], source[0])


def test_class_weights_follow_the_class_names_not_the_positions(tmp_path):
    source = make(3)
    save_checkpoint(source, tmp_path / "src.ckpt", class_names=["Café de Flore", "Tour Eiffel", "Big Ben"])
    target = make(3)
    fresh = target.loss_fn.weight[0].detach().clone()
    report = load_finetune_weights(target, tmp_path / "src.ckpt",
                                   target_class_names=["Sagrada Família", "Big Ben", "Café de Flore"])
    weight = target.loss_fn.weight.detach()
    assert torch.equal(weight[1], source.loss_fn.weight[2].detach())  # Big Ben
    assert torch.equal(weight[2], source.loss_fn.weight[0].detach())  # Café de Flore
    assert torch.equal(weight[0], fresh)
    assert report["class_weights"] == ("class weights: 2 of 3 classes copied by class names (Big Ben, Café de Flore); "
                                       "1 new, initialised fresh (Sagrada Família)")


def test_landmark_ids_are_used_only_when_asked_and_none_transfers_nothing(tmp_path):
    source = make(3)
    save_checkpoint(source, tmp_path / "src.ckpt", landmark_ids=[1, 2, 3])
    target = make(3)
    before = target.loss_fn.weight.detach().clone()
    report = load_finetune_weights(target, tmp_path / "src.ckpt", target_landmark_ids=[1, 2, 3])  # default: by name
    assert "no class names to match classes by (GLDv2 runs have landmark ids: model.class_transfer=landmark_id" \
        in report["class_weights"]
    assert torch.equal(target.loss_fn.weight.detach(), before)
    report = load_finetune_weights(target, tmp_path / "src.ckpt", target_landmark_ids=[1, 2, 3], class_transfer="none")
    assert "not transferred" in report["class_weights"]
    assert torch.equal(target.loss_fn.weight.detach(), before)
    with pytest.raises(ValueError, match="class_transfer must be one of"):
        load_finetune_weights(target, tmp_path / "src.ckpt", class_transfer="position")


def _cvnet_file(model, path) -> None:
    """``model`` (a resnet50 EmbeddingModel) saved in CVNet's pycls key layout."""
    backbone = model.backbone.state_dict()
    state = {f"encoder_q.{k}": backbone[pycls_to_timm_key(k)].clone() for k in expected_pycls_keys(50)}
    state.update({"encoder_q.head.fc.weight": model.fc.weight.detach().clone(),
                  "encoder_q.head.fc.bias": model.fc.bias.detach().clone(), "encoder_q.head.pool.p": torch.tensor([3.0])})
    torch.save({"epoch": 1, "model_state": state}, path)


@pytest.mark.parametrize("head", ["gem", "rgem+gemp+sgem"])
def test_init_from_cvnet_weights_loads_the_global_model(tmp_path, head):
    cvnet = dict(input_format="bgr", mean=list(CVNET_MEAN_BGR), std=list(CVNET_STD_BGR))
    source = LandmarkRetrievalModule(num_classes=2, backbone="resnet50", embedding_dim=2048, head=head, model_options=cvnet)
    _cvnet_file(source.model, tmp_path / "CVNet_R50.pyth")
    target = LandmarkRetrievalModule(num_classes=5, backbone="resnet50", embedding_dim=2048, head=head, model_options=cvnet)
    report = load_finetune_weights(target, tmp_path / "CVNet_R50.pyth")
    assert report["source"] == "cvnet" and "initialised fresh" in report["class_weights"]
    for name, value in source.model.backbone.state_dict().items():
        assert torch.equal(target.model.backbone.state_dict()[name], value), name
    assert torch.equal(target.model.fc.weight, source.model.fc.weight)
    rgb = LandmarkRetrievalModule(num_classes=5, backbone="resnet50", embedding_dim=2048, head=head)
    with pytest.raises(ValueError, match="input_format: 'bgr' stored, 'rgb' configured.*input_format=bgr"):
        load_finetune_weights(rgb, tmp_path / "CVNet_R50.pyth")
