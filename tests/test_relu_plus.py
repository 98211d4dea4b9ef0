"""ReLU+ placement (SuperGlobal's published ResNet), training and inference behaviour, errors."""
import pytest
import timm
import torch
from torch import nn

from sg_train.model import EmbeddingModel
from sg_train.relu_plus import ReLUPlus, apply_relu_plus

ALPHA = 0.014


def _resnet(name):
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool="")


def test_relu_plus_module_and_gradient():
    x = torch.tensor([-1.0, 0.0, 0.01, 0.014, 0.5], requires_grad=True)
    out = ReLUPlus(ALPHA)(x)
    assert torch.equal(out.detach(), torch.tensor([ALPHA, ALPHA, ALPHA, ALPHA, 0.5]))
    out.sum().backward()
    assert x.grad[-1] == 1.0 and x.grad[:3].abs().sum() == 0


def test_placement_on_bottleneck_resnet50():
    model = _resnet("resnet50")
    patched = apply_relu_plus(model, ALPHA)
    expected = [f"layer1.{b}.{a}" for b in range(3) for a in ("act1", "act2", "act3")]
    expected += [f"layer2.{b}.act3" for b in range(4)] + [f"layer3.{b}.act3" for b in range(6)]
    assert patched == expected
    for name, module in model.named_modules():
        if isinstance(module, ReLUPlus):
            assert name in expected and module.alpha == ALPHA
    # stage 2-3 inner activations, all of stage 4 and the stem keep a plain ReLU
    assert isinstance(model.act1, nn.ReLU)
    for stage in (2, 3):
        for block in getattr(model, f"layer{stage}"):
            assert isinstance(block.act1, nn.ReLU) and isinstance(block.act2, nn.ReLU)
    for block in model.layer4:
        assert all(isinstance(getattr(block, a), nn.ReLU) for a in ("act1", "act2", "act3"))


def test_block_outputs_are_floored_except_stage_4():
    model = apply_relu_plus_model("resnet50")
    outputs = {}
    for stage in (1, 2, 3, 4):
        getattr(model, f"layer{stage}")[-1].register_forward_hook(lambda m, i, o, s=stage: outputs.__setitem__(s, o))
    inner = []
    model.layer1[0].act1.register_forward_hook(lambda m, i, o: inner.append(o))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for stage in (1, 2, 3):
        assert outputs[stage].min().item() == pytest.approx(ALPHA)
    assert outputs[4].min().item() == 0.0
    assert inner[0].min().item() == pytest.approx(ALPHA)


def apply_relu_plus_model(name):
    model = _resnet(name).eval()
    apply_relu_plus(model, ALPHA)
    return model


def test_placement_on_basic_block_resnet18():
    model = _resnet("resnet18")
    patched = apply_relu_plus(model, ALPHA)
    expected = [f"layer1.{b}.{a}" for b in range(2) for a in ("act1", "act2")]
    expected += [f"layer2.{b}.act2" for b in range(2)] + [f"layer3.{b}.act2" for b in range(2)]
    assert patched == expected
    assert isinstance(model.layer2[0].act1, nn.ReLU) and isinstance(model.layer4[1].act2, nn.ReLU)


def test_reapplying_changes_alpha_only():
    model = _resnet("resnet18")
    first = apply_relu_plus(model, ALPHA)
    assert apply_relu_plus(model, 0.05) == first
    assert model.layer1[0].act1.alpha == 0.05


def test_gradient_flows_in_training():
    model = _resnet("resnet18").train()
    for m in model.modules():  # timm zero-inits each block's last BN gamma; undo it so every branch is live
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    apply_relu_plus(model, ALPHA)
    model(torch.randn(2, 3, 64, 64)).pow(2).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_non_resnet_backbone_is_refused_with_its_name():
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=0, global_pool="")
    with pytest.raises(TypeError, match="efficientnet_b0"):
        apply_relu_plus(model)
    with pytest.raises(TypeError, match="Sequential"):
        apply_relu_plus(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    with pytest.raises(TypeError, match="mobilenetv3_small_050"):
        EmbeddingModel("mobilenetv3_small_050", "gem", 16, relu_plus=True)


def test_embedding_model_switch():
    on = EmbeddingModel("resnet18", "gem", 16, relu_plus=True, relu_plus_alpha=0.02)
    off = EmbeddingModel("resnet18", "gem", 16)
    assert isinstance(on.backbone.layer1[0].act1, ReLUPlus) and on.backbone.layer1[0].act1.alpha == 0.02
    assert not any(isinstance(m, ReLUPlus) for m in off.modules())
