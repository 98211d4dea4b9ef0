"""CFCD's stage-1 descriptor: GeM (p = 3, fixed) -> FC -> BatchNorm1d, L2 only at the end (the "fc_bn"
neck); its configuration, multi-scale extraction, export and the CVNet layout's refusal; a short
MadaCos fit (bassyess/CFCD core/model/model_s1.py, model_deploy.py, evaler/infer.py)."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train
from sg_train.cvnet import cvnet_state_dict_to_embedding_model, embedding_model_to_cvnet_state_dict, write_cvnet_weights
from sg_train.embedder import load_model
from sg_train.errors import OptionError
from sg_train.export import PARITY_TOLERANCE, export_model
from sg_train.inference import model_from_checkpoint
from sg_train.model import (
    CONFIG_KEYS,
    MODEL_CONFIG_VERSION,
    EmbeddingModel,
    ModelConfigError,
    config_differences,
    model_config_arguments,
    resize_for_scale,
)
from sg_train.module import LandmarkRetrievalModule
from sg_train.weights_io import MODEL_PREFIX, WeightsMismatchError, write_checkpoint_record
from test_training import write_config

CFCD = {"neck": "fc_bn", "gem_p": 3.0, "gem_p_learnable": False}
SCALES = (0.3535, 0.5, 0.7071, 1.0, 1.4142)  # CFCD's evaler/infer.py


def images(batch, height, width, seed=5):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def randomise_batch_norm(model: nn.Module) -> None:
    """Every BatchNorm (the backbone's and the neck's) away from identity, so a skipped BN shows."""
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for tensor, low, high in ((module.weight, 0.5, 1.5), (module.bias, -0.3, 0.3),
                                      (module.running_mean, -0.2, 0.2), (module.running_var, 0.5, 1.5)):
                tensor.data.copy_(torch.empty_like(tensor).uniform_(low, high, generator=generator))


def cfcd_model(backbone="resnet18", dim=16, **options) -> EmbeddingModel:
    torch.manual_seed(0)
    model = EmbeddingModel(backbone, "gem", dim, **{**CFCD, **options})
    randomise_batch_norm(model)
    return model.eval()


def write_checkpoint(model: EmbeddingModel, path, config=None) -> None:
    """What train.py's checkpoints hold for the model: its weights under ``model.`` and the record."""
    checkpoint = {"state_dict": {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}}
    write_checkpoint_record(checkpoint, model_config=config or model.config, landmark_ids=None, protocol=None)
    torch.save(checkpoint, path)


@pytest.fixture(scope="module")
def model():
    return cfcd_model()


# --------------------------------------------------------------------------- the descriptor path
def test_forward_is_gem3_fc_bn_then_l2_by_hand(model):
    x = images(3, 64, 80)
    with torch.no_grad():
        fmap = model.backbone.forward_features(x)
        pooled = fmap.clamp(min=1e-6).pow(3).mean(dim=(-2, -1)).pow(1 / 3)  # GeneralizedMeanPooling(norm=3.0)
        linear = pooled @ model.fc.weight.T + model.fc.bias  # no L2 before the FC
        bn = model.bn
        reference = (linear - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        torch.testing.assert_close(model.embed(x), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), reference / reference.norm(dim=-1, keepdim=True), atol=1e-6, rtol=1e-5)
    assert isinstance(model.fc, nn.Linear) and model.fc.bias is not None and model.fc.in_features == 512
    assert isinstance(model.bn, nn.BatchNorm1d) and model.bn.num_features == 16
    assert EmbeddingModel("resnet18", "gem", 16).bn is None  # the default neck stays L2 -> FC


def test_training_batch_norm_uses_the_batch_and_refuses_one_image():
    model = cfcd_model().train()
    x = images(4, 64, 64)
    with torch.no_grad():
        linear = model.fc(model.pooled(x))
        mean, var = linear.mean(0), linear.var(0, unbiased=False)
        expected = (linear - mean) / torch.sqrt(var + model.bn.eps) * model.bn.weight + model.bn.bias
        torch.testing.assert_close(model.embed(x), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(OptionError, match=r"fc_bn neck \(model.model_options.neck\).*at least 2 images.*got 1"):
        model(images(1, 64, 64))
    with torch.no_grad():
        assert model.eval()(images(1, 64, 64)).shape == (1, 16)  # running statistics: one image is fine


def test_fixed_p_is_no_parameter_and_stays_after_an_optimizer_step():
    module = LandmarkRetrievalModule(num_classes=5, backbone="resnet18", head="gem", embedding_dim=16,
                                     model_options=CFCD, loss="madacos", loss_options={"rho": 0.02},
                                     optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9,
                                                                              nesterov=True, weight_decay=1e-4))
    pool = module.model.head.pool
    assert not pool.learnable and pool.p == 3.0 and not isinstance(pool.p, torch.Tensor)
    assert not any(name.startswith("head.") for name, _ in module.model.named_parameters())
    assert "head.pool.p" not in module.model.state_dict()
    head = {name for name, _ in module.model.parameter_groups()["head"]}
    assert head == {"fc.weight", "fc.bias", "bn.weight", "bn.bias"}
    optimizer = module.build_optimizer(total_steps=4)["optimizer"]
    no_decay = [p for g in optimizer.param_groups if g["name"] == "head_no_decay" for p in g["params"]]
    assert {id(p) for p in no_decay} == {id(module.model.fc.bias), id(module.model.bn.weight), id(module.model.bn.bias)}

    fc_before = module.model.fc.weight.detach().clone()
    module.train()
    output = module.loss_fn(module(images(4, 64, 64)), torch.tensor([0, 1, 2, 0]))
    output.loss.backward()
    optimizer.step()
    assert pool.p == 3.0 and not torch.equal(module.model.fc.weight, fc_before)
    assert int(module.model.bn.num_batches_tracked) == 1


# --------------------------------------------------------------------------- configuration
def test_config_round_trip_rebuilds_the_same_descriptors(model):
    config = model.config
    assert config["version"] == MODEL_CONFIG_VERSION == 2
    assert (config["neck"], config["gem_p"], config["gem_p_learnable"]) == ("fc_bn", 3.0, False)
    assert json.loads(json.dumps(config)) == config
    rebuilt = EmbeddingModel.from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    assert rebuilt.config == config
    x = images(2, 64, 72)
    with torch.no_grad():
        assert torch.equal(rebuilt.extract(x, SCALES), model.extract(x, SCALES))


def _version_1(config: dict) -> dict:
    """A configuration as sg-train wrote it before ``neck`` and ``gem_p_learnable`` existed."""
    return {**{k: v for k, v in config.items() if k not in ("neck", "gem_p_learnable")}, "version": 1}


def test_a_version_1_configuration_still_rebuilds_its_model(tmp_path):
    torch.manual_seed(0)
    old = EmbeddingModel("resnet18", "rgem+gem+sgem", 16, gem_p=2.5, scales=(0.7071, 1.0)).eval()
    v1 = _version_1(old.config)
    arguments = model_config_arguments(v1)
    assert list(arguments) == list(CONFIG_KEYS)
    assert (arguments["neck"], arguments["gem_p_learnable"]) == ("l2_fc", True)
    path = tmp_path / "v1.ckpt"
    write_checkpoint(old, path, config=v1)
    rebuilt = model_from_checkpoint(path)
    assert rebuilt.config == old.config and rebuilt.bn is None and rebuilt.head.pool.learnable
    x = images(2, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt.extract(x), old.extract(x))

    with pytest.raises(ModelConfigError, match=r"version 1 is damaged or edited: unknown \['neck'\]"):
        EmbeddingModel.from_config({**v1, "neck": "fc_bn"})  # version 1 had no neck
    with pytest.raises(ModelConfigError, match=r"version 2 is damaged or edited: missing \['neck'\]"):
        EmbeddingModel.from_config({k: v for k, v in old.config.items() if k != "neck"})


@pytest.mark.parametrize("kwargs, message", [({"neck": "bn_fc"}, "option 'neck' must be one of .*got 'bn_fc'"),
                                             ({"neck": 1}, "option 'neck' must be one of 'l2_fc', 'fc_bn'"),
                                             ({"gem_p_learnable": "no"}, "gem_p_learnable.*true or false")])
def test_bad_options(kwargs, message):
    with pytest.raises(OptionError, match=message):
        EmbeddingModel("resnet18", "gem", 8, **kwargs)


def test_a_fixed_p_is_compared_when_loading_weights():
    stored = model_config_arguments(cfcd_model().config)
    other = {**stored, "gem_p": 4.0}
    free = frozenset({"gem_p", "scales"})  # sg_train.finetune.FREE_WHEN_LOADING
    assert config_differences(stored, other, ignore=free) == ["gem_p: 3.0 stored, 4.0 configured"]
    learnable = {**stored, "gem_p_learnable": True}
    assert config_differences(learnable, {**learnable, "gem_p": 4.0}, ignore=free) == []  # an initial value
    assert config_differences(stored, {**stored, "neck": "l2_fc"}) == ["neck: 'fc_bn' stored, 'l2_fc' configured"]


# --------------------------------------------------------------------------- multi-scale extraction
def test_multiscale_extraction_averages_the_per_scale_l2_descriptors(model):
    x = images(2, 70, 90)
    with torch.no_grad():
        got = model.extract(x, SCALES)
        per_scale = torch.stack([model(resize_for_scale(x, s)) for s in SCALES])  # CFCD: L2 per scale, mean, L2
        torch.testing.assert_close(got, F.normalize(per_scale.mean(0), dim=-1), atol=1e-6, rtol=1e-5)
        assert got.shape == (2, 16) and torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-6)
        torch.testing.assert_close(model.extract(x, [1.0]), model(x), atol=1e-6, rtol=1e-5)
        single = torch.cat([model.extract(x[i:i + 1], SCALES) for i in range(2)])
        torch.testing.assert_close(got, single, atol=1e-5, rtol=1e-5)  # eval-mode BN: no batch coupling

        sgem = EmbeddingModel("resnet18", "gem+sgem", 16, **CFCD).eval()
        sgem.load_state_dict(model.state_dict())
        torch.testing.assert_close(sgem.extract(x, SCALES), F.normalize(per_scale.amax(0), dim=-1), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- export, CVNet, switches
def test_torchscript_and_onnx_equal_the_eager_extraction(model, tmp_path):
    exported = cfcd_model(scales=(0.7071, 1.0))
    record = export_model(exported, tmp_path / "out")  # checks both files against the model at two sizes
    assert set(record["files"]) == {"torchscript", "onnx"}
    assert "neck is 'fc_bn'" in record["not_written"]["cvnet"]
    for size, diff in (*record["files"]["torchscript"]["max_abs_difference"].items(),
                       *record["files"]["onnx"]["max_abs_difference"].items()):
        assert diff <= PARITY_TOLERANCE, size

    x = images(2, 72, 56, seed=9)  # a size neither was traced or checked at
    with torch.no_grad():
        expected = exported.extract(x)
        script = torch.jit.load(io.BytesIO((tmp_path / "out" / "descriptor.torchscript.pt").read_bytes()))
        assert (script(x) - expected).abs().max() <= PARITY_TOLERANCE
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "descriptor.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(["descriptors"], {"images": x.numpy()})[0]
    assert np.abs(onnx_out - expected.numpy()).max() <= PARITY_TOLERANCE


def test_cvnet_layout_refuses_the_fc_bn_neck(tmp_path):
    resnet50 = cfcd_model("resnet50", 32, input_format="bgr")
    path = tmp_path / "cvnet.pyth"
    with pytest.raises(WeightsMismatchError) as caught:
        write_cvnet_weights(resnet50, path)
    message = str(caught.value)
    assert "\n" not in message and "neck is 'fc_bn' (model.model_options.neck" in message and "torchscript or onnx" in message
    assert not path.exists()
    with pytest.raises(WeightsMismatchError, match="neck is 'fc_bn'"):
        export_model(resnet50, tmp_path / "out", ["cvnet"])
    assert not (tmp_path / "out").exists()

    l2_fc = EmbeddingModel("resnet50", "gem", 32, input_format="bgr", mean=(0.406, 0.456, 0.485),
                           std=(0.225, 0.224, 0.229))
    state = embedding_model_to_cvnet_state_dict(l2_fc)
    with pytest.raises(WeightsMismatchError, match=r"neck='fc_bn' \(model.model_options.neck\) cannot be built"):
        cvnet_state_dict_to_embedding_model(state, 50, neck="fc_bn")
    fixed = cvnet_state_dict_to_embedding_model(state, 50, gem_p=3.0, gem_p_learnable=False)
    assert fixed.head.pool.p == 3.0  # the file's p is not loaded into a fixed GeM


def test_switches_and_load_model_on_a_cfcd_checkpoint(model, tmp_path):
    path = tmp_path / "cfcd.ckpt"
    write_checkpoint(model, path)
    switched = model_from_checkpoint(path, rgem=True, gemp=True, sgem=True, relu_plus=True, scales=(0.7071, 1.0))
    config = switched.config
    assert (config["head"], config["neck"], config["relu_plus"]) == ("rgem+gemp+sgem", "fc_bn", True)
    with torch.no_grad():
        out = switched.extract(images(2, 64, 64))
    assert torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-6)

    embedder = load_model(path, scales=[1.0])
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 64, 80, 3), dtype=np.uint8)
    got = embedder.embed(pixels)
    mean, std = torch.tensor(model.mean)[:, None, None], torch.tensor(model.std)[:, None, None]
    batch = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        expected = model(batch).numpy()
    assert got.shape == (2, 16) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert np.abs(got - expected).max() < 1e-4


# --------------------------------------------------------------------------- a short fit
def test_two_step_madacos_fit_keeps_p_and_rebuilds_from_its_checkpoint(tmp_path, synthetic_data):
    config = write_config(tmp_path, synthetic_data, head="gem", loss="madacos", loss_options={"rho": 0.02},
                          model_options=CFCD)
    cli = train.main(["fit", "--config", str(config), "--trainer.limit_train_batches=2", "--trainer.logger=false"])
    assert cli.trainer.global_step == 2
    model = cli.model.model
    assert model.neck == "fc_bn" and model.head.pool.p == 3.0
    assert int(model.bn.num_batches_tracked) == 2 and not torch.equal(model.bn.running_mean, torch.zeros(32))
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    rebuilt = model_from_checkpoint(last)
    assert rebuilt.config == model.config
    x = images(2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.extract(x), model.eval().extract(x))
