"""EmbeddingModel: descriptor path, multi-scale extraction, small images, backbones, strict weights."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sg_train.backbone import create_backbone, load_backbone_weights
from sg_train.weights_io import WeightsMismatchError, read_state_dict
from sg_train.errors import OptionError
from sg_train.eval_protocols import ProtocolError, resolve_protocol
from sg_train.model import MAX_SCALE, MIN_SCALE, EmbeddingModel, check_scales, resize_for_scale
from sg_train.pooling import gem, regional_gem

SCALES = (1 / math.sqrt(2), 1.0, math.sqrt(2))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EmbeddingModel("resnet18", "rgem+gem+sgem", 32).eval()


def test_forward_is_the_documented_path(model):
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        out = model(x)
        fmap = model.backbone.forward_features(x)
        pooled = gem(regional_gem(fmap), model.head.pool.p)
        expected = F.normalize(model.fc(F.normalize(pooled, dim=-1)), dim=-1)
    assert out.shape == (2, 32)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert torch.allclose(out, expected, atol=1e-6)
    assert isinstance(model.fc, torch.nn.Linear) and model.fc.bias is not None and model.fc.in_features == 512


def _manual_extract(model, x, scales, aggregate):
    feats = []
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(
            x, size=(int(x.shape[-2] * s), int(x.shape[-1] * s)), mode="bilinear", align_corners=False, antialias=True
        )
        feats.append(model.fc(F.normalize(model.pooled(xs), dim=-1)))
    return F.normalize(aggregate(torch.stack(feats)), dim=-1)


def test_extract_equals_manual_resize_forward_max(model):
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        got = model.extract(x, SCALES)
        manual = torch.stack([model(resize_for_scale(x, s)) for s in SCALES]).amax(0)  # forward is already L2
        assert torch.allclose(got, F.normalize(manual, dim=-1), atol=1e-6)
        assert torch.allclose(model.extract(x, [1.0]), model(x), atol=1e-6)
        assert got.shape == (2, 32) and torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_extract_finite_and_mean_aggregation():
    torch.manual_seed(0)
    finite = EmbeddingModel("resnet18", "gemp+sgem", 16, sgem="finite", sgem_p=10.0, scales=SCALES).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = _manual_extract(
            finite, x, SCALES, lambda d: (d - d.amin((0, 2), keepdim=True)).pow(10).mean(0).pow(0.1) + d.amin((0, 2))[:, None]
        )
        assert torch.allclose(finite.extract(x), expected, atol=1e-6)  # default scales from the constructor
        plain = EmbeddingModel("resnet18", "gemp", 16).eval()
        plain.load_state_dict(finite.state_dict())
        assert torch.allclose(plain.extract(x, SCALES), _manual_extract(plain, x, SCALES, lambda d: d.mean(0)), atol=1e-6)


def test_batched_extract_equals_one_by_one(model):
    x = torch.randn(3, 3, 64, 72)
    with torch.no_grad():
        batched = model.extract(x, SCALES)
        single = torch.cat([model.extract(x[i : i + 1], SCALES) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_tiny_image_does_not_crash(model):
    """32 px -> a 1x1 last map at scale 1 (and 1x1 at 0.5): the published R-GeM crashes there."""
    tiny = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        fmap = model.backbone.forward_features(tiny)
        assert fmap.shape[-2:] == (1, 1)
        with pytest.raises(RuntimeError):
            torch.nn.ReflectionPad2d(2)(fmap)
        out = model.extract(tiny, (0.5, 1.0, 2.0))
    assert out.shape == (1, 32) and torch.isfinite(out).all()
    assert resize_for_scale(torch.zeros(1, 3, 1, 1), 0.25).shape[-2:] == (1, 1)


def test_gradients_reach_backbone_fc_and_gem_p():
    torch.manual_seed(0)
    m = EmbeddingModel("resnet18", "rgem+gem", 16).train()
    m(torch.randn(4, 3, 64, 64)).pow(3).sum().backward()
    assert m.backbone.conv1.weight.grad.abs().sum() > 0
    assert m.fc.weight.grad.abs().sum() > 0 and m.fc.bias.grad.abs().sum() > 0
    assert m.head.pool.p.grad is not None and m.head.pool.p.grad.abs().item() > 0


def test_parameter_groups(model):
    groups = model.parameter_groups()
    names = {g: {n for n, _ in pairs} for g, pairs in groups.items()}
    assert names["head"] == {"head.pool.p", "fc.weight", "fc.bias"}
    assert all(n.startswith("backbone.") for n in names["backbone"])
    assert len(names["backbone"]) + 3 == len(list(model.parameters()))
    assert {n for n, _ in EmbeddingModel("resnet18", "gemp", 8).parameter_groups()["head"]} == {"fc.weight", "fc.bias"}


def test_preprocessing_defaults_and_bgr():
    rgb = EmbeddingModel("resnet18", "gem", 8)
    assert rgb.input_format == "rgb"
    assert rgb.mean == pytest.approx((0.485, 0.456, 0.406)) and rgb.std == pytest.approx((0.229, 0.224, 0.225))
    bgr = EmbeddingModel("resnet18", "gem", 8, input_format="bgr")
    assert bgr.mean == pytest.approx((0.406, 0.456, 0.485)) and bgr.std == pytest.approx((0.225, 0.224, 0.229))
    custom = EmbeddingModel("resnet18", "gem", 8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert custom.preprocessing == {"input_format": "rgb", "scale": 1 / 255, "mean": (0.5,) * 3, "std": (0.25,) * 3}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"head": "gem+foo"}, "valid names"),
        ({"input_format": "hsv"}, "input_format"),
        ({"mean": (0.5, 0.5)}, "mean needs 3 values"),
        ({"std": (0.0, 1.0, 1.0)}, "std must be > 0"),
        ({"scales": ()}, "scales"),
        ({"scales": (1.0, -0.5)}, "scales"),
        ({"sgem": "avg"}, "'sgem' must be one of 'max', 'finite'"),
        ({"embedding_dim": 0}, "embedding_dim"),
    ],
)
def test_bad_options(kwargs, message):
    options = {"backbone": "resnet18", "head": "gem", "embedding_dim": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        EmbeddingModel(**options)


# --- backbones ------------------------------------------------------------------------------
def test_unknown_backbone_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown timm backbone 'resnet5'.*resnet50"):
        create_backbone("resnet5")
    with pytest.raises(ValueError, match=r"unknown timm backbone 'resnt18'.*resnet18"):
        EmbeddingModel("resnt18")


def test_non_nchw_backbone_is_refused_by_name():
    with pytest.raises(ValueError, match=r"backbone 'vit_tiny_patch16_224'.*not an NCHW feature map"):
        create_backbone("vit_tiny_patch16_224")


def test_other_cnn_backbones_work():
    m = EmbeddingModel("mobilenetv3_small_050", "rgem+gemp+sgem", 8).eval()
    with torch.no_grad():
        assert m.extract(torch.randn(1, 3, 64, 64), SCALES).shape == (1, 8)


# --- strict weights ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source_state():
    torch.manual_seed(3)
    return timm.create_model("resnet18", pretrained=False).state_dict()  # with its classifier "fc"


def _assert_loaded(m, state):
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_good_file_loads_and_classifier_is_dropped(tmp_path, source_state):
    path = tmp_path / "r18.pth"
    torch.save(source_state, path)
    m = EmbeddingModel("resnet18", "gem", 8, pretrained_weights=str(path))
    _assert_loaded(m, source_state)
    report = load_backbone_weights(m.backbone, path)
    assert report["dropped_classifier_keys"] == ["fc.bias", "fc.weight"]


@pytest.mark.parametrize("container", ["state_dict", "model", "model_state"])
def test_nested_files_load(tmp_path, source_state, container):
    path = tmp_path / "r18.pt"
    torch.save({container: source_state, "epoch": 3}, path)
    backbone = create_backbone("resnet18")
    load_backbone_weights(backbone, path)
    assert torch.equal(backbone.conv1.weight, source_state["conv1.weight"])


def test_safetensors_and_module_prefix(tmp_path, source_state):
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in source_state.items()}, str(path))
    m = EmbeddingModel("resnet18", "gem", 8, pretrained_weights=path)
    _assert_loaded(m, source_state)
    ddp = tmp_path / "ddp.bin"
    torch.save({f"module.{k}": v for k, v in source_state.items()}, ddp)
    assert set(read_state_dict(ddp)) == set(source_state)


def test_file_without_batch_counters_loads(tmp_path, source_state):
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in source_state.items() if not k.endswith("num_batches_tracked")}, path)
    load_backbone_weights(create_backbone("resnet18"), path)


def test_missing_key_is_refused_and_named(tmp_path, source_state):
    path = tmp_path / "missing.pth"
    torch.save({k: v for k, v in source_state.items() if k != "layer2.1.bn2.running_var"}, path)
    backbone = create_backbone("resnet18")
    before = backbone.conv1.weight.clone()
    with pytest.raises(WeightsMismatchError, match=r"missing from the file: 1 key: layer2.1.bn2.running_var"):
        load_backbone_weights(backbone, path)
    assert torch.equal(backbone.conv1.weight, before)  # nothing was loaded


def test_unexpected_key_is_refused_and_named(tmp_path, source_state):
    path = tmp_path / "extra.pth"
    torch.save({**source_state, "layer5.0.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsMismatchError, match=r"not in the model: 1 key: layer5.0.conv1.weight"):
        EmbeddingModel("resnet18", "gem", 8, pretrained_weights=path)


def test_wrong_shape_and_wrong_architecture_are_refused(tmp_path, source_state):
    path = tmp_path / "shape.pth"
    torch.save({**source_state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(WeightsMismatchError, match=r"wrong shape: 1 key: conv1.weight \(file \(64, 3, 3, 3\)"):
        load_backbone_weights(create_backbone("resnet18"), path)
    r34 = tmp_path / "r18_for_34.pth"
    torch.save(source_state, r34)
    with pytest.raises(WeightsMismatchError, match=r"backbone 'resnet34'.*missing from the file: \d+ keys: layer1.2"):
        EmbeddingModel("resnet34", "gem", 8, pretrained_weights=r34)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_weights.pth"):
        EmbeddingModel("resnet18", "gem", 8, pretrained_weights=tmp_path / "no_such_weights.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMismatchError, match="cannot read weights file"):
        read_state_dict(junk)
    not_tensors = tmp_path / "meta.pth"
    torch.save({"epoch": 1, "lr": 0.1}, not_tensors)
    with pytest.raises(WeightsMismatchError, match="does not hold a state dict"):
        read_state_dict(not_tensors)


@pytest.mark.parametrize("scales, message", [
    ((), "is empty"), ((1.0, float("nan")), "not nan"), ((float("inf"),), "not inf"), ((1.0, 0.0), "not 0.0"),
    ((0.7071, 1.0, 0.7071), "0.7071 more than once"), ((1.0, 1000.0), "from 0.0625 .* to 4, not 1000.0"),
    ((1e-9,), "not 1e-09"), ((0.0624, 4.01), "not 0.0624, 4.01"),
])
def test_every_scale_list_is_checked_by_one_rule(scales, message):
    """The model, the evaluation protocols (evaluate.py/embed --scales) and export share check_scales:
    a repeated scale was extracted twice and weighed double; nan and inf reached the resize."""
    with pytest.raises(OptionError, match=message):
        check_scales(scales)
    with pytest.raises(OptionError, match=message):
        EmbeddingModel("resnet18", "gem", 8, scales=scales)
    with pytest.raises(ProtocolError, match=message):
        resolve_protocol("revisitop", scales=scales)


def test_scales_from_one_sixteenth_to_four_are_accepted():
    """MIN_SCALE and MAX_SCALE are inside the range: scale 1000 asked for 393 GB at once, 1e-9 shrank
    every image to 1 px."""
    assert (MIN_SCALE, MAX_SCALE) == (1 / 16, 4.0)
    assert check_scales([MIN_SCALE, 1, MAX_SCALE]) == (0.0625, 1.0, 4.0)
