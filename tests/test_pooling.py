"""Pooling heads against their formulas on small, hand-checkable tensors."""
import math

import pytest
import torch
from torch import nn

from sg_train.pooling import (
    GeM,
    GeMPlus,
    HeadSpec,
    PoolingHead,
    RegionalGeM,
    gem,
    parse_head_spec,
    regional_gem,
    register_pooling,
    scale_gem_finite,
    scale_gem_max,
    scale_mean,
)
from sg_train.pooling import head as head_module

# one 2x2 channel with values 1..4 and one with 0, 0, 0, 8
X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]]])


# --- GeM / GeM+ -----------------------------------------------------------------------------
def test_gem_hand_values():
    assert torch.allclose(gem(X, 1.0, eps=0.0), torch.tensor([[2.5, 2.0]]))
    assert torch.allclose(gem(X, 2.0, eps=0.0), torch.tensor([[math.sqrt(7.5), math.sqrt(16.0)]]))
    # p = 3 on the second channel: (512 / 4)^(1/3) = 128^(1/3)
    assert torch.allclose(gem(X, 3.0)[0, 1], torch.tensor(128.0 ** (1 / 3)), atol=1e-5)
    # large p tends to the max
    assert torch.allclose(gem(X, 30.0), torch.tensor([[4.0, 8.0]]), rtol=5e-2)


def test_gem_clamps_at_eps():
    neg = -torch.ones(1, 1, 2, 2)
    assert torch.allclose(gem(neg, 3.0, eps=1e-6), torch.tensor([[1e-6]]))


def test_gem_module_p_is_learnable_and_gets_gradient():
    pool = GeM(p=3.0)
    assert isinstance(pool.p, nn.Parameter) and pool.p.shape == (1,) and pool.p.item() == 3.0
    x = torch.rand(2, 4, 5, 5) + 0.1
    out = pool(x)
    assert out.shape == (2, 4)
    assert torch.allclose(out, x.pow(3).mean((-2, -1)).pow(1 / 3), atol=1e-6)
    out.sum().backward()
    assert pool.p.grad is not None and pool.p.grad.abs().item() > 0


def test_gem_plus_is_fixed_p_4_6():
    pool = GeMPlus()
    assert pool.p == 4.6 and list(pool.parameters()) == []
    x = torch.rand(2, 3, 4, 6) + 0.05
    assert torch.allclose(pool(x), x.pow(4.6).mean((-2, -1)).pow(1 / 4.6), atol=1e-6)


def test_gem_rejects_non_map_and_bad_p():
    with pytest.raises(ValueError, match="NCHW"):
        gem(torch.rand(2, 3))
    with pytest.raises(ValueError, match="p must be > 0"):
        GeM(p=0)


def test_gem_runs_in_float32_for_half_inputs():
    x = (torch.rand(1, 2, 3, 3) * 40).to(torch.bfloat16)
    out = gem(x, 4.6)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# --- Regional-GeM -------------------------------------------------------------------------
def _published_rgem(x, p=2.5, k=5):
    """0.5 * LPPool2d(p, k, stride=1)(ReflectionPad((k-1)//2)(x / (k^2)^(1/p))) + 0.5 * x."""
    lp = nn.LPPool2d(p, k, stride=1)
    pad = nn.ReflectionPad2d((k - 1) // 2)
    return 0.5 * lp(pad(x / (k * k) ** (1.0 / p))) + 0.5 * x


@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 4, 3, 3), (1, 2, 5, 12)])
def test_regional_gem_matches_lppool_formula(shape):
    x = torch.rand(shape) * 3 + 0.01
    out = regional_gem(x)
    assert out.shape == x.shape
    assert torch.allclose(out, _published_rgem(x), rtol=1e-5, atol=1e-6)
    assert torch.allclose(RegionalGeM(p=3.0, kernel_size=3)(x), _published_rgem(x, 3.0, 3), rtol=1e-5, atol=1e-6)


def test_regional_gem_hand_values():
    const = torch.full((1, 1, 4, 4), 2.0)
    assert torch.allclose(regional_gem(const), const)  # a constant map is its own local mean
    x = torch.rand(1, 2, 4, 4) + 0.1
    assert torch.allclose(regional_gem(x, kernel_size=1), x, atol=1e-6)  # 1x1 window: identity
    # centre of a 5x5 map with one 5 at the centre, zeros elsewhere: 0.5*(5^2.5/25)^(1/2.5) + 0.5*5
    spike = torch.zeros(1, 1, 5, 5)
    spike[0, 0, 2, 2] = 5.0
    expected = 0.5 * (5.0**2.5 / 25) ** (1 / 2.5) + 2.5
    assert regional_gem(spike)[0, 0, 2, 2].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (1, 6), (2, 7)])
def test_regional_gem_small_maps_use_replicate_padding(hw):
    x = torch.rand(1, 3, *hw) + 0.1
    with pytest.raises(RuntimeError):  # what the published code does on such a map
        nn.ReflectionPad2d(2)(x)
    out = regional_gem(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    padded = nn.ReplicationPad2d(2)(x.pow(2.5))
    local = nn.functional.avg_pool2d(padded, 5, stride=1).pow(1 / 2.5)
    assert torch.allclose(out, 0.5 * local + 0.5 * x, atol=1e-6)


def test_regional_gem_gradient_finite_on_zero_windows():
    x = torch.zeros(1, 1, 6, 6, requires_grad=True)
    regional_gem(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_regional_gem_rejects_even_kernel():
    with pytest.raises(ValueError, match="odd"):
        RegionalGeM(kernel_size=4)
    with pytest.raises(ValueError, match="odd"):
        regional_gem(torch.rand(1, 1, 5, 5), kernel_size=2)


# --- Scale-GeM -----------------------------------------------------------------------------
def test_scale_gem_max_hand_values():
    s1 = torch.tensor([[3.0, 4.0]])  # -> (0.6, 0.8)
    s2 = torch.tensor([[1.0, 0.0]])  # -> (1.0, 0.0)
    assert torch.allclose(scale_gem_max([s1, s2]), torch.tensor([[1.0, 0.8]]))
    assert torch.allclose(scale_gem_max(torch.stack([s1, s2])), torch.tensor([[1.0, 0.8]]))


def test_scale_gem_finite_formula_and_limits():
    x = torch.tensor([[[0.5, -0.2, 0.1]], [[0.3, 0.4, -0.1]], [[0.0, 0.2, 0.6]]])  # (S=3, B=1, D=3)
    gamma = -0.2
    expected = ((x - gamma) ** 10).mean(0) ** 0.1 + gamma
    assert torch.allclose(scale_gem_finite(x), expected, atol=1e-6)
    assert torch.allclose(scale_gem_finite(x, p=1.0), x.mean(0), atol=1e-6)  # p = 1: the mean
    assert torch.allclose(scale_gem_finite(x, p=100.0), x.amax(0), atol=2e-2)  # p -> inf: the max


def test_scale_gem_finite_gamma_is_per_image():
    x = torch.randn(3, 4, 8)
    batched = scale_gem_finite(x)
    single = torch.cat([scale_gem_finite(x[:, i : i + 1]) for i in range(4)])
    assert torch.allclose(batched, single, atol=1e-6)


def test_scale_mean_and_shape_errors():
    x = torch.randn(3, 2, 5)
    assert torch.allclose(scale_mean(x), x.mean(0))
    with pytest.raises(ValueError, match="S, B, D"):
        scale_gem_max(torch.randn(2, 5))


# --- head spec ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, expected",
    [
        ("gem", HeadSpec("gem")),
        ("gemp", HeadSpec("gemp")),
        ("rgem+gemp", HeadSpec("gemp", regional=True)),
        ("rgem+gemp+sgem", HeadSpec("gemp", regional=True, scale_gem=True)),
        ("rgem+gem+sgem", HeadSpec("gem", regional=True, scale_gem=True)),
        (" RGeM + GeMP ", HeadSpec("gemp", regional=True)),
        ("avg+sgem", HeadSpec("avg", scale_gem=True)),
        ("max", HeadSpec("max")),
    ],
)
def test_parse_head_spec(spec, expected):
    parsed = parse_head_spec(spec)
    assert parsed == expected
    assert parse_head_spec(str(parsed)) == parsed


@pytest.mark.parametrize(
    "spec, message",
    [
        ("foo", r"unknown head name\(s\) \['foo'\].*valid names: rgem, avg, gem, gemp, max, sgem"),
        ("rgem+gemx", "unknown head name"),
        ("gem+gemp", "exactly one global pooling"),
        ("rgem+sgem", "exactly one global pooling"),
        ("gem+gem", "repeats"),
        ("gemp+rgem", "before 'gemp'"),
        ("sgem+gem", "after 'gem'"),
        ("gem++sgem", "empty name"),
        ("", "non-empty"),
    ],
)
def test_parse_head_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_head_spec(spec)


def test_pooling_head_composes_rgem_and_pooling():
    x = torch.rand(2, 6, 7, 7) + 0.01
    head = PoolingHead("rgem+gemp")
    assert torch.allclose(head(x), gem(regional_gem(x), 4.6, eps=1e-8), atol=1e-6)
    head = PoolingHead("gem", gem_p=2.0)
    assert torch.allclose(head(x), x.pow(2).mean((-2, -1)).sqrt(), atol=1e-6)
    assert torch.allclose(PoolingHead("avg")(x), x.mean((-2, -1)))
    assert torch.allclose(PoolingHead("max")(x), x.amax((-2, -1)))


def test_pooling_head_scale_aggregation_modes():
    d = torch.randn(3, 2, 5)
    assert torch.allclose(PoolingHead("gem+sgem").aggregate_scales(d), scale_gem_max(d))
    assert torch.allclose(
        PoolingHead("gem+sgem", sgem="finite", sgem_p=7.0).aggregate_scales(d), scale_gem_finite(d, 7.0)
    )
    assert torch.allclose(PoolingHead("gem").aggregate_scales(d), d.mean(0))
    with pytest.raises(ValueError, match="sgem must be one of"):
        PoolingHead("gem+sgem", sgem="mean")


def test_register_pooling(monkeypatch):
    monkeypatch.setattr(head_module, "_POOLINGS", dict(head_module._POOLINGS))
    register_pooling("sum", lambda o: _Sum())
    assert parse_head_spec("rgem+sum") == HeadSpec("sum", regional=True)
    assert torch.allclose(PoolingHead("sum")(torch.ones(1, 2, 3, 3)), torch.full((1, 2), 9.0))
    with pytest.raises(ValueError, match="already taken"):
        register_pooling("gem", lambda o: _Sum())


class _Sum(nn.Module):
    def forward(self, x):
        return x.sum((-2, -1))
