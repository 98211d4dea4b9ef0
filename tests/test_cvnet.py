"""CVNet checkpoint conversion: same descriptors as a pycls ResNet computing them SuperGlobal's way.

The reference below is written from the published pycls/SuperGlobal code (CVNet and
SuperGlobal ``model/resnet.py``, SuperGlobal ``modules/coarse_retrieval/*.py``): pycls key
names, stride on the 3x3 conv, stem with max-pool, GeM head (``head.pool.p``) + FC with bias,
L2 before the FC, torchvision resize per scale, R-GeM through LPPool2d + ReflectionPad2d, GeM+
through adaptive_avg_pool1d, S-GeM max/finite on the stacked per-scale FC outputs, mean when
S-GeM is off, and a final L2. ReLU+ follows the published placement (block outputs of stages
1-3 and stage-1 inner activations floored at 0.014; stage 4 plain). With ReLU+ off the
reference uses plain ReLUs everywhere; the published code (by a slip) still floors the
stage-1 inner activations when its ``relup`` flag is off, which we do not reproduce.
"""
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn

from sg_train.weights_io import WeightsMismatchError
from sg_train.cvnet import (
    CVNET_MEAN_BGR,
    CVNET_STD_BGR,
    cvnet_state_dict_to_embedding_model,
    load_cvnet_weights,
    expected_pycls_keys,
    pycls_to_timm_key,
    timm_to_pycls_key,
)

ALPHA = 0.014
SCALES = (0.7071, 1.0, 1.4142)  # SuperGlobal's 3-scale list


# --- a minimal pycls ResNet, computing descriptors the CVNet/SuperGlobal way ------------------
class Bottleneck(nn.Module):  # pycls BottleneckTransform: 1x1, BN, act, 3x3 (stride), BN, act, 1x1, BN
    def __init__(self, w_in, w_out, stride, w_b):
        super().__init__()
        self.a = nn.Conv2d(w_in, w_b, 1, bias=False)
        self.a_bn = nn.BatchNorm2d(w_b)
        self.b = nn.Conv2d(w_b, w_b, 3, stride=stride, padding=1, bias=False)
        self.b_bn = nn.BatchNorm2d(w_b)
        self.c = nn.Conv2d(w_b, w_out, 1, bias=False)
        self.c_bn = nn.BatchNorm2d(w_out)

    def forward(self, x, floor):
        x = self.a_bn(self.a(x)).clamp(min=floor)
        x = self.b_bn(self.b(x)).clamp(min=floor)
        return self.c_bn(self.c(x))


class ResBlock(nn.Module):
    def __init__(self, w_in, w_out, stride, w_b):
        super().__init__()
        if w_in != w_out or stride != 1:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, bias=False)
            self.bn = nn.BatchNorm2d(w_out)
        self.f = Bottleneck(w_in, w_out, stride, w_b)

    def forward(self, x, inner_floor, out_floor):
        shortcut = self.bn(self.proj(x)) if hasattr(self, "proj") else x
        return (shortcut + self.f(x, inner_floor)).clamp(min=out_floor)


class Stage(nn.Module):
    def __init__(self, w_in, w_out, stride, depth, w_b):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", ResBlock(w_in if i == 0 else w_out, w_out, stride if i == 0 else 1, w_b))

    def forward(self, x, inner_floor, out_floor):
        for block in self.children():
            x = block(x, inner_floor, out_floor)
        return x


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x):
        return self.pool(self.relu(self.bn(self.conv(x))))


class GlobalHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.Module()
        self.pool.p = nn.Parameter(torch.ones(1) * 3)
        self.fc = nn.Linear(2048, 2048, bias=True)


class PyclsResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Stem()
        self.s1 = Stage(64, 256, 1, 3, 64)
        self.s2 = Stage(256, 512, 2, 4, 128)
        self.s3 = Stage(512, 1024, 2, 6, 256)
        self.s4 = Stage(1024, 2048, 2, 3, 512)
        self.head = GlobalHead()

    def feature_map(self, x, relup):
        a = ALPHA if relup else 0.0
        x = self.s1(self.stem(x), a, a)
        x = self.s3(self.s2(x, 0.0, a), 0.0, a)
        return self.s4(x, 0.0, 0.0)

    def descriptor(self, x4, gemp, rgem):  # SuperGlobal's _forward_singlescale after s4
        if rgem:
            x4 = 0.5 * nn.LPPool2d(2.5, 5, stride=1)(nn.ReflectionPad2d(2)(x4 / 25 ** (1 / 2.5))) + 0.5 * x4
        x = x4.reshape(x4.shape[0], x4.shape[1], -1)
        if gemp:
            x = F.adaptive_avg_pool1d(x.clamp(1e-8).pow(4.6), 1).pow(1 / 4.6)
        else:
            p = self.head.pool.p
            x = F.adaptive_avg_pool1d(x.clamp(min=1e-6).pow(p), 1).pow(1.0 / p)
        x = F.normalize(x.reshape(x.shape[0], -1), p=2, dim=-1)
        return self.head.fc(x)

    def extract(self, image, scales, relup, gemp, rgem, sgem, maps=None):
        """One image (1, 3, H, W) as SuperGlobal's extract_global_descriptor + extract_feature."""
        feats = []
        for i, s in enumerate(scales):
            if maps is not None and i in maps:
                x4 = maps[i]
            else:
                x = TF.resize(image, [int(image.shape[-2] * s), int(image.shape[-1] * s)], antialias=True)
                x4 = self.feature_map(x, relup)
                if maps is not None:
                    maps[i] = x4
            feats.append(self.descriptor(x4, gemp, rgem))
        x = torch.stack(feats, 0)
        if sgem == "max":
            x = torch.max(F.normalize(x, p=2, dim=-1), 0)[0]
        elif sgem == "finite":
            gamma = x.min()
            x = (x - gamma).pow(10.0).mean(0).pow(1.0 / 10.0) + gamma
        else:
            x = torch.mean(x, 0)
        return F.normalize(x, p=2, dim=1)


def _randomised_reference():
    torch.manual_seed(1)
    ref = PyclsResNet50()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
            m.momentum = None  # running stats = the calibration batch's statistics
    with torch.no_grad():
        ref.head.pool.p.fill_(2.7)
        nn.init.normal_(ref.head.fc.bias, std=0.05)
        ref.train()
        ref.feature_map(torch.randn(4, 3, 96, 100), relup=False)
    return ref.eval()


@pytest.fixture(scope="module")
def reference():
    return _randomised_reference()


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    """The reference saved like a CVNet release: model_state with encoder_q. + re-ranker keys."""
    state = {f"encoder_q.{k}": v.clone() for k, v in reference.state_dict().items()}
    state["conv2ds.0.weight"] = torch.zeros(256, 1024, 3, 3)
    state["cv_learner.encoders.0.weight"] = torch.zeros(4)
    path = tmp_path_factory.mktemp("cvnet") / "CVNet_R50.pyth"
    torch.save({"epoch": 1, "model_state": state}, path)
    return path


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(2)
    return torch.randn(1, 3, 96, 100)  # smallest scale still gives a 3x3 map (published R-GeM needs >= 3)


# (relu_plus, rgem, gemp, sgem): all off, all on (SuperGlobal), all on with the finite S-GeM, and
# two mixed settings, so that each option is compared on and off next to different partners
ALL_OFF = (False, False, False, None)
COMBOS = [
    ALL_OFF,
    (True, True, True, "max"),
    (True, True, True, "finite"),
    (False, True, False, "max"),
    (True, False, True, None),
]


def _head_spec(rgem, gemp, sgem):
    return "+".join((["rgem"] if rgem else []) + ["gemp" if gemp else "gem"] + (["sgem"] if sgem else []))


@pytest.fixture(scope="module")
def reference_maps():
    return {False: {}, True: {}}  # per-scale s4 maps of the reference, shared across head options


@pytest.fixture(scope="module")
def converted(checkpoint):
    """load_cvnet_weights per option setting, built once."""
    models = {}

    def get(relu_plus, rgem, gemp, sgem):
        key = (relu_plus, rgem, gemp, sgem)
        if key not in models:
            models[key] = load_cvnet_weights(
                checkpoint, 50, head=_head_spec(rgem, gemp, sgem), relu_plus=relu_plus, sgem=sgem or "max", scales=SCALES
            )
        return models[key]

    return get


@pytest.mark.parametrize("relu_plus, rgem, gemp, sgem", COMBOS)
def test_converted_model_gives_the_reference_descriptors(
    reference, converted, image, reference_maps, relu_plus, rgem, gemp, sgem
):
    model = converted(relu_plus, rgem, gemp, sgem)
    with torch.no_grad():
        expected = reference.extract(image, SCALES, relu_plus, gemp, rgem, sgem, reference_maps[relu_plus])
        got = model.extract(image)
    assert got.shape == (1, 2048)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()


def test_options_change_the_descriptor(reference, image, reference_maps):
    """The comparison above is sensitive: each option moves the descriptor far beyond its tolerance."""
    with torch.no_grad():
        base = reference.extract(image, SCALES, True, True, True, "max", reference_maps[True])
        for flipped in [
            (False, True, True, "max", reference_maps[False]),
            (True, False, True, "max", reference_maps[True]),
            (True, True, False, "max", reference_maps[True]),
            (True, True, True, None, reference_maps[True]),
            (True, True, True, "finite", reference_maps[True]),
        ]:
            other = reference.extract(image, SCALES, *flipped[:4], flipped[4])
            assert (other - base).abs().max() > 2e-4, flipped  # 20x the comparison's atol


def test_single_scale_forward_and_preprocessing(reference, converted, image):
    model = converted(*ALL_OFF)
    assert model.input_format == "bgr"
    assert model.mean == CVNET_MEAN_BGR and model.std == CVNET_STD_BGR
    assert model.head.pool.p.item() == pytest.approx(2.7)
    assert not model.training
    with torch.no_grad():
        expected = F.normalize(reference.descriptor(reference.feature_map(image, False), False, False), dim=-1)
        assert torch.allclose(model(image), expected, rtol=1e-4, atol=1e-5)


def test_globalmodel_prefix(reference, image):
    state = {f"globalmodel.{k}": v for k, v in reference.state_dict().items()}
    model = cvnet_state_dict_to_embedding_model(state, 50, head="gem")
    with torch.no_grad():
        expected = F.normalize(reference.descriptor(reference.feature_map(image, False), False, False), dim=-1)
        assert torch.allclose(model(image), expected, rtol=1e-4, atol=1e-5)


def test_key_map():
    assert pycls_to_timm_key("stem.conv.weight") == "conv1.weight"
    assert pycls_to_timm_key("s1.b1.f.a_bn.running_var") == "layer1.0.bn1.running_var"
    assert pycls_to_timm_key("s3.b6.f.b.weight") == "layer3.5.conv2.weight"
    assert pycls_to_timm_key("s2.b1.proj.weight") == "layer2.0.downsample.0.weight"
    assert pycls_to_timm_key("s2.b1.bn.bias") == "layer2.0.downsample.1.bias"
    assert pycls_to_timm_key("head.fc.weight") is None
    assert sorted(PyclsResNet50().state_dict()) == sorted(expected_pycls_keys(50) + ["head.fc.weight", "head.fc.bias", "head.pool.p"])
    for depth in (50, 101):
        timm_keys = timm.create_model(f"resnet{depth}", num_classes=0).state_dict().keys()
        assert sorted(pycls_to_timm_key(k) for k in expected_pycls_keys(depth)) == sorted(timm_keys)


def test_inverse_key_map():
    assert timm_to_pycls_key("conv1.weight") == "stem.conv.weight"
    assert timm_to_pycls_key("layer1.0.bn1.running_var") == "s1.b1.f.a_bn.running_var"
    assert timm_to_pycls_key("layer3.5.conv2.weight") == "s3.b6.f.b.weight"
    assert timm_to_pycls_key("layer2.0.downsample.1.bias") == "s2.b1.bn.bias"
    for key in ("fc.weight", "layer1.0.act1.alpha", "layer1.0.se.fc1.weight", "layer1.0.downsample.2.weight"):
        assert timm_to_pycls_key(key) is None, key
    for depth in (50, 101):
        for key in expected_pycls_keys(depth):
            assert timm_to_pycls_key(pycls_to_timm_key(key)) == key


# --- refusals -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def state(checkpoint):
    return torch.load(checkpoint, weights_only=True)["model_state"]


def test_resnet50_weights_as_depth_101_are_refused(state):
    with pytest.raises(WeightsMismatchError, match=r"ResNet-101; the file looks like a ResNet-50") as err:
        cvnet_state_dict_to_embedding_model(state, 101)
    msg = str(err.value)
    assert "missing" in msg and "encoder_q.s3.b7.f.a.weight" in msg and "s3.b23" in msg


def test_extra_blocks_are_refused(state):
    extra = dict(state)
    for suffix in ("f.a.weight", "f.a_bn.weight"):
        extra[f"encoder_q.s3.b7.{suffix}"] = torch.zeros(1)
    with pytest.raises(WeightsMismatchError, match=r"unexpected 2 keys: encoder_q.s3.b7.f.a.weight.*blocks s3.b7"):
        cvnet_state_dict_to_embedding_model(extra, 50)


def test_missing_or_misshaped_keys_are_refused(state):
    missing = {k: v for k, v in state.items() if k != "encoder_q.s2.b3.f.b_bn.running_mean"}
    with pytest.raises(WeightsMismatchError, match=r"missing 1 key: encoder_q.s2.b3.f.b_bn.running_mean"):
        cvnet_state_dict_to_embedding_model(missing, 50)
    no_head = {k: v for k, v in state.items() if k != "encoder_q.head.pool.p"}
    with pytest.raises(WeightsMismatchError, match=r"global head: missing 1 key: encoder_q.head.pool.p"):
        cvnet_state_dict_to_embedding_model(no_head, 50)
    shaped = dict(state)
    shaped["encoder_q.s1.b1.f.b.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(WeightsMismatchError, match=r"wrong shapes.*encoder_q.s1.b1.f.b.weight \(file \(64, 64, 1, 1\)"):
        cvnet_state_dict_to_embedding_model(shaped, 50)
    with pytest.raises(WeightsMismatchError, match="not a CVNet checkpoint"):
        cvnet_state_dict_to_embedding_model({"encoder_k.stem.conv.weight": torch.zeros(1)}, 50)


def test_bad_arguments(state, tmp_path):
    with pytest.raises(ValueError, match="depth must be one of"):
        cvnet_state_dict_to_embedding_model(state, 34)
    with pytest.raises(TypeError, match="backbone"):
        cvnet_state_dict_to_embedding_model(state, 50, backbone="resnet18")
    with pytest.raises(FileNotFoundError, match="nope.pyth"):
        load_cvnet_weights(tmp_path / "nope.pyth", 50)


def test_every_option_is_compared_on_and_off():
    for i in range(4):
        assert len({combo[i] for combo in COMBOS}) >= 2
    assert {combo[3] for combo in COMBOS} == {None, "max", "finite"}
