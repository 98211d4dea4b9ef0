"""A checkpoint describes itself: it stores the full, versioned model configuration, the label map and
the protocol, and loading rebuilds exactly the stored model whatever today's defaults are."""
from __future__ import annotations

import inspect
import json
import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import train
from sg_train.errors import UserInputError
from sg_train.finetune import load_finetune_weights
from sg_train.inference import model_from_checkpoint
from sg_train.model import CONFIG_KEYS, MODEL_CONFIG_VERSION, EmbeddingModel, ModelConfigError
from sg_train.module import LandmarkRetrievalModule
from sg_train.weights_io import WeightsFileError, WeightsMismatchError
from test_training import write_config

IMAGES = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))


def descriptors(model: EmbeddingModel) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.extract(IMAGES)


def make(**kwargs) -> LandmarkRetrievalModule:
    options = {"num_classes": 3, "backbone": "resnet18", "head": "rgem+gemp+sgem", "embedding_dim": 16, **kwargs}
    return LandmarkRetrievalModule(**options)


def save_through_lightning(module: LandmarkRetrievalModule, path) -> None:
    """``trainer.save_checkpoint`` on an unfitted module: Lightning calls ``on_save_checkpoint``."""
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)


def patch_defaults(monkeypatch, **changes) -> None:
    """Change ``EmbeddingModel``'s keyword defaults, as a later sg-train version might."""
    defaults = {**EmbeddingModel.__init__.__kwdefaults__, **changes}
    monkeypatch.setattr(EmbeddingModel.__init__, "__kwdefaults__", defaults)


def test_config_holds_every_constructor_value_in_effect_and_rebuilds_the_model():
    parameters = set(inspect.signature(EmbeddingModel.__init__).parameters) - {"self", "pretrained_weights"}
    assert set(CONFIG_KEYS) == parameters  # a new argument must be added to the configuration
    model = EmbeddingModel("resnet18", "GemP + sgem", 16, gemp_p=5.0, scales=(0.5, 1.0), sgem="finite",
                           input_format="bgr")
    config = model.config
    assert set(config) == {"format", "version", *CONFIG_KEYS}
    assert config["version"] == MODEL_CONFIG_VERSION and config["head"] == "gemp+sgem"
    assert config["mean"] == [0.406, 0.456, 0.485]  # the backbone's default, resolved, in BGR order
    assert json.loads(json.dumps(config)) == config  # plain values only
    config["scales"].append(2.0)
    assert model.config["scales"] == [0.5, 1.0]  # a copy each time

    rebuilt = EmbeddingModel.from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config == model.config
    assert torch.equal(descriptors(rebuilt), descriptors(model))


def test_a_checkpoint_is_rebuilt_as_trained_after_the_defaults_change(tmp_path, monkeypatch):
    module = make()
    path = tmp_path / "model.ckpt"
    save_through_lightning(module, path)
    trained = descriptors(module.model)

    patch_defaults(monkeypatch, gemp_p=3.0, rgem_p=4.0, scales=(0.5, 1.0))
    assert EmbeddingModel("resnet18", "gemp", 16).config["gemp_p"] == 3.0  # today's defaults did change

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stored configuration is used: no fallback warning
        rebuilt = model_from_checkpoint(path)
    assert rebuilt.config == module.model.config
    assert torch.equal(descriptors(rebuilt), trained)

    # Without the stored configuration (a checkpoint from before it existed) the model would differ.
    old = torch.load(path, weights_only=False)
    del old["sg_train"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="today's defaults"):
        legacy = model_from_checkpoint(tmp_path / "old.ckpt")
    assert legacy.config["gemp_p"] == 3.0 and legacy.config["scales"] == [0.5, 1.0]
    assert not torch.allclose(descriptors(legacy), trained, atol=1e-3)


def test_test_time_switches_apply_on_top_of_the_stored_configuration(tmp_path, monkeypatch):
    module = make(head="gem", model_options={"gemp_p": 5.0})
    save_through_lightning(module, tmp_path / "model.ckpt")
    patch_defaults(monkeypatch, gemp_p=3.0)
    model = model_from_checkpoint(tmp_path / "model.ckpt", gemp=True, sgem=True, relu_plus=True, scales=(0.7071, 1.0))
    config = model.config
    assert (config["head"], config["gemp_p"], config["relu_plus"]) == ("gemp+sgem", 5.0, True)
    assert config["scales"] == [0.7071, 1.0]


class _Protocol(Callback):
    """Stands for a retrieval callback that names its evaluation protocol."""

    protocol = types.SimpleNamespace(name="revisited-medium")


def test_a_training_checkpoint_stores_model_config_label_map_and_protocol(tmp_path, synthetic_data):
    config = write_config(tmp_path, synthetic_data)
    cli = train.main(["--config", str(config), "--trainer.logger=false", "--trainer.limit_train_batches=1",
                      "--trainer.limit_val_batches=0"], run=False)
    cli.trainer.callbacks.append(_Protocol())
    cli.trainer.fit(cli.model, cli.datamodule)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    record = torch.load(last, map_location="cpu", weights_only=False)["sg_train"]
    assert record["landmark_ids"] == cli.datamodule.landmark_ids and len(record["landmark_ids"]) == 12
    assert record["protocol"] == "revisited-medium"
    assert record["model"] == cli.model.model.config
    assert "landmark_ids" not in cli.model.hparams  # the label map is no hyper-parameter
    # (the run keeps channels_last weights: the same numbers up to the convolution kernels' rounding)
    torch.testing.assert_close(descriptors(model_from_checkpoint(last)), descriptors(cli.model.model))


def test_a_configuration_this_version_cannot_read_is_refused(tmp_path):
    module = make()
    path = tmp_path / "model.ckpt"
    save_through_lightning(module, path)
    saved = torch.load(path, weights_only=False)
    saved["sg_train"]["model"]["version"] = MODEL_CONFIG_VERSION + 1
    torch.save(saved, tmp_path / "newer.ckpt")
    with pytest.raises(ModelConfigError, match=rf"newer.ckpt: the model configuration has version "
                                                rf"{MODEL_CONFIG_VERSION + 1}, written by a newer sg-train.*upgrade"):
        model_from_checkpoint(tmp_path / "newer.ckpt")
    assert issubclass(ModelConfigError, WeightsFileError) and issubclass(ModelConfigError, UserInputError)

    config = module.model.config
    with pytest.raises(ModelConfigError, match="not an sg-train model configuration"):
        EmbeddingModel.from_config({**config, "format": "timm/pretrained_cfg"})
    with pytest.raises(ModelConfigError, match=r"missing \['gemp_p'\]"):
        EmbeddingModel.from_config({k: v for k, v in config.items() if k != "gemp_p"})
    with pytest.raises(ModelConfigError, match=r"unknown \['gem_power'\]"):
        EmbeddingModel.from_config({**config, "gem_power": 3.0})

    # An old checkpoint (no stored configuration) naming an argument this version does not have.
    del saved["sg_train"]
    saved["hyper_parameters"]["model_options"] = {"gem_power": 3.0}
    torch.save(saved, tmp_path / "renamed.ckpt")
    with pytest.raises(WeightsFileError, match=r"model_options \['gem_power'\] are no EmbeddingModel arguments"):
        model_from_checkpoint(tmp_path / "renamed.ckpt")


def test_init_from_and_resume_refuse_a_model_configured_otherwise(tmp_path):
    source = make(head="rgem+gem", model_options={"rgem_p": 3.0})
    save_through_lightning(source, tmp_path / "src.ckpt")

    same = make(head="rgem+gem", model_options={"rgem_p": 3.0, "gem_p": 2.0, "scales": [0.5, 1.0], "gemp_p": 5.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gem_p (replaced by the loaded p), scales and an unused gemp_p are free
        load_finetune_weights(same, tmp_path / "src.ckpt")
    assert torch.equal(same.model.head.pool.p, source.model.head.pool.p)

    other = make(head="rgem+gem")  # rgem_p 2.5: same weights, another model
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(WeightsMismatchError, match=r"rgem_p: 3.0 stored, 2.5 configured.*model_options"):
        load_finetune_weights(other, tmp_path / "src.ckpt")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing loaded
    with pytest.raises(WeightsMismatchError, match=r"rgem_p: 3.0 stored, 2.5 configured"):
        other.on_load_checkpoint(torch.load(tmp_path / "src.ckpt", weights_only=False))  # resume / validate

    old = torch.load(tmp_path / "src.ckpt", weights_only=False)
    del old["sg_train"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="stores no model configuration"):
        load_finetune_weights(other, tmp_path / "old.ckpt")  # unchecked, as before, but said
