"""Margin losses against their formulas on small hand-checkable tensors (docs/design.md §3).

The fixtures use identity class weights and unit embeddings built from Pythagorean triples,
so every cosine is an exact, readable number and the expected logits are written by hand
(with ``math``) in each test, independently of the library's helper functions.
"""
from __future__ import annotations

import math

import pytest
import torch

from sg_train.losses import (
    LOSSES,
    ArcFace,
    CosFace,
    CurricularFace,
    DynamicArcFace,
    MadaCos,
    MarginLoss,
    MarginOutput,
    SubCenterArcFace,
    available_losses,
    build_loss,
)
from sg_train.losses.margins import arcface_target, dynamic_margins, median_index

# Rows are unit vectors; with identity weights, cos θ_j is the j-th entry of the row.
ROWS = [
    [0.6, 0.8, 0.0, 0.0],
    [0.48, 0.6, 0.64, 0.0],
    [0.0, 0.28, 0.96, 0.0],
    [-0.96, 0.0, 0.0, 0.28],
]
LABELS = [1, 1, 2, 0]  # target cosines 0.8, 0.6, 0.96, -0.96 (the last one hits ArcFace's fallback)


def _with_identity_weights(loss: MarginLoss) -> MarginLoss:
    with torch.no_grad():
        loss.weight.copy_(torch.eye(loss.weight.shape[0], loss.weight.shape[1]))
    return loss


def _ce(logits: list[list[float]], labels: list[int]) -> float:
    """Mean cross-entropy written out: −log(exp(z_y) / Σ_j exp(z_j))."""
    total = 0.0
    for z, y in zip(logits, labels):
        zmax = max(z)
        total += -(z[y] - zmax - math.log(sum(math.exp(v - zmax) for v in z)))
    return total / len(labels)


def _arc(c: float, m: float) -> float:
    """ArcFace target via the angle itself (an independent route from the code's product formula)."""
    if c > math.cos(math.pi - m):
        return math.cos(math.acos(c) + m)
    return c - m * math.sin(m)


def _run(loss: MarginLoss, rows=ROWS, labels=LABELS) -> MarginOutput:
    return loss(torch.tensor(rows), torch.tensor(labels))


# ------------------------------------------------------------------------------- ArcFace
def test_arcface_matches_formula():
    s, m = 30.0, 0.5
    loss = _with_identity_weights(ArcFace(4, 4, s=s, m=m))
    out = _run(loss)
    expected_logits = []
    for row, y in zip(ROWS, LABELS):
        z = [s * c for c in row]
        z[y] = s * _arc(row[y], m)
        expected_logits.append(z)
    # the last sample's cos θ_y = −0.96 < cos(π − 0.5) = −0.8776: linear fallback
    assert ROWS[3][0] < math.cos(math.pi - m)
    assert expected_logits[3][0] == pytest.approx(s * (-0.96 - 0.5 * math.sin(0.5)))
    assert out.loss.item() == pytest.approx(_ce(expected_logits, LABELS), rel=1e-5)
    assert torch.allclose(out.cosine, torch.tensor(ROWS), atol=1e-6)
    assert torch.allclose(loss.logits(out.cosine, torch.tensor(LABELS)), torch.tensor(expected_logits), atol=1e-4)
    assert loss.live_stats() == {"scale": s, "margin": m}


def test_arcface_target_is_monotone_and_penalising():
    # The fallback keeps the target increasing in cos θ_y (cos(θ + m) alone turns back up past
    # θ = π − m) and never above cos θ_y; at the threshold it sits just below −1 (−cos m − m·sin m).
    m = 0.3
    c = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    t = arcface_target(c, m)
    assert (t.diff() > 0).all()
    assert (t <= c).all()
    th = math.cos(math.pi - m)
    below = arcface_target(torch.tensor([th - 1e-9], dtype=torch.float64), m).item()
    assert below == pytest.approx(-math.cos(m) - m * math.sin(m), abs=1e-6)


def test_arcface_cos_one_has_finite_gradient():
    loss = _with_identity_weights(ArcFace(4, 4, s=30.0, m=0.2))
    e = torch.tensor([[1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    out = loss(e, torch.tensor([0]))
    out.loss.backward()
    assert torch.isfinite(e.grad).all() and torch.isfinite(loss.weight.grad).all()


# ------------------------------------------------------------------------------- CosFace
def test_cosface_matches_formula():
    s, m = 20.0, 0.35
    loss = _with_identity_weights(CosFace(4, 4, s=s, m=m))
    out = _run(loss)
    expected = []
    for row, y in zip(ROWS, LABELS):
        z = [s * c for c in row]
        z[y] = s * (row[y] - m)
        expected.append(z)
    assert out.loss.item() == pytest.approx(_ce(expected, LABELS), rel=1e-5)


# ------------------------------------------------------------------------ CurricularFace
def _curricular_expected(rows, labels, s, m, t):
    logits = []
    for row, y in zip(rows, labels):
        c_y = row[y]
        cos_y_m = c_y * math.cos(m) - math.sqrt(1 - c_y * c_y) * math.sin(m)  # raw cos(θ_y + m)
        z = []
        for j, c in enumerate(row):
            if j == y:
                z.append(s * _arc(c_y, m))
            elif c > cos_y_m:
                z.append(s * c * (t + c))
            else:
                z.append(s * c)
        logits.append(z)
    return logits


def test_curricularface_formula_and_t_updates():
    s, m = 30.0, 0.5
    loss = _with_identity_weights(CurricularFace(4, 4, s=s, m=m))
    assert loss.t.item() == 0.0
    mean_cos_y = sum(r[y] for r, y in zip(ROWS, LABELS)) / len(LABELS)  # (0.8+0.6+0.96−0.96)/4 = 0.35

    loss.train()
    out = _run(loss)
    t1 = 0.01 * mean_cos_y  # t is updated first, then used (authors' order)
    assert loss.t.item() == pytest.approx(t1, rel=1e-6)
    expected = _curricular_expected(ROWS, LABELS, s, m, t1)
    # sample 1 (cos θ_y = 0.6, cos(θ_y+m) ≈ 0.19) has hard negatives 0.48 and 0.64: modulated
    assert expected[1][0] == pytest.approx(s * 0.48 * (t1 + 0.48))
    assert out.loss.item() == pytest.approx(_ce(expected, LABELS), rel=1e-5)

    _run(loss)
    t2 = 0.01 * mean_cos_y + 0.99 * t1
    assert loss.t.item() == pytest.approx(t2, rel=1e-6)

    loss.eval()
    out_eval = _run(loss)
    assert loss.t.item() == pytest.approx(t2, rel=1e-6)  # no update in eval
    assert out_eval.loss.item() == pytest.approx(_ce(_curricular_expected(ROWS, LABELS, s, m, t2), LABELS), rel=1e-5)
    assert "t" in loss.state_dict() and loss.live_stats()["t"].item() == pytest.approx(t2, rel=1e-6)


# ------------------------------------------------------------------------ sub-centre
def test_subcenter_takes_max_over_centres():
    s, m = 10.0, 0.2
    loss = SubCenterArcFace(2, 2, s=s, m=m, k=2)
    assert loss.weight.shape == (4, 2)
    with torch.no_grad():  # class-major rows: class 0 = {+x, +y}, class 1 = {−x, −y}
        loss.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    e = torch.tensor([[0.6, 0.8], [0.8, -0.6]])
    labels = torch.tensor([0, 1])
    cos = loss.cosine(e)
    # sample 0: class 0 = max(0.6, 0.8) = 0.8, class 1 = max(−0.6, −0.8) = −0.6
    # sample 1: class 0 = max(0.8, −0.6) = 0.8, class 1 = max(−0.8, 0.6) = 0.6
    assert torch.allclose(cos, torch.tensor([[0.8, -0.6], [0.8, 0.6]]), atol=1e-6)
    out = loss(e, labels)
    expected = [[s * _arc(0.8, m), s * -0.6], [s * 0.8, s * _arc(0.6, m)]]
    assert out.loss.item() == pytest.approx(_ce(expected, [0, 1]), rel=1e-5)


# ------------------------------------------------------------------------ dynamic margins
def test_dynamic_margin_values():
    # n^(−1/4) = 1, 1/2, 1/3, 1/10 → min 0.1, max 1
    margins = dynamic_margins(torch.tensor([1, 16, 81, 10000]))
    expected = [0.45 * (x - 0.1) / 0.9 + 0.05 for x in (1.0, 0.5, 1 / 3, 0.1)]
    assert expected == pytest.approx([0.5, 0.25, 0.05 + 0.45 * (7 / 30) / 0.9, 0.05])
    assert margins.tolist() == pytest.approx(expected, rel=1e-6)
    # equal counts: empty range → midpoint b + a/2; zero counts are treated as one image
    assert dynamic_margins(torch.tensor([5, 5, 5])).tolist() == pytest.approx([0.275] * 3)
    assert dynamic_margins(torch.tensor([0, 1, 10000])).tolist() == pytest.approx([0.5, 0.5, 0.05])
    with pytest.raises(ValueError):
        dynamic_margins(torch.tensor([-1, 3]))


def test_dynamic_arcface_uses_per_class_margin_and_saves_it():
    counts = torch.tensor([1, 16, 81, 10000])
    s = 30.0
    loss = _with_identity_weights(DynamicArcFace(4, 4, class_counts=counts, s=s))
    margins = [0.5, 0.25, 0.05 + 0.45 * (7 / 30) / 0.9, 0.05]
    out = _run(loss)
    expected = []
    for row, y in zip(ROWS, LABELS):
        z = [s * c for c in row]
        z[y] = s * _arc(row[y], margins[y])
        expected.append(z)
    assert out.loss.item() == pytest.approx(_ce(expected, LABELS), rel=1e-5)
    state = loss.state_dict()
    assert "margins" in state and state["margins"].tolist() == pytest.approx(margins, rel=1e-6)
    fresh = DynamicArcFace(4, 4, class_counts=torch.ones(4))
    fresh.load_state_dict(state)
    assert fresh.margins.tolist() == pytest.approx(margins, rel=1e-6)
    with pytest.raises(ValueError, match="class_counts has 3 entries"):
        DynamicArcFace(4, 4, class_counts=torch.ones(3))


# ------------------------------------------------------------------------------- MadaCos
RHO = 0.02
LOG_CONST = math.log(9999999 * (1 - RHO) / RHO)


def test_madacos_scale_and_margin_on_hand_made_batch():
    loss = _with_identity_weights(MadaCos(4, 4, rho=RHO))
    rows = [ROWS[0], ROWS[1], ROWS[2], [0.96, 0.0, 0.0, 0.28]]
    labels = [1, 1, 2, 3]  # target cosines 0.8, 0.6, 0.96, 0.28
    # even batch: the median is the lower one, 0.6 (sample 1), not 0.8 or the mean 0.7
    c = 0.6
    s = max(32.0, LOG_CONST / (1 - c))
    assert s == pytest.approx(50.0245, abs=1e-3)
    b = math.exp(s * 0.48) + math.exp(s * 0.64) + math.exp(s * 0.0)  # sample 1's negatives
    m = max(0.0, c - math.log(b * RHO / (1 - RHO)) / s)
    assert 0.03 < m < 0.04
    loss.train()
    out = _run(loss, rows, labels)
    stats = loss.live_stats()
    assert stats["median_cosine"].item() == pytest.approx(c, abs=1e-6)
    assert stats["scale"].item() == pytest.approx(s, rel=1e-5)
    assert stats["margin"].item() == pytest.approx(m, abs=1e-5)
    expected = []
    for row, y in zip(rows, labels):
        z = [s * v for v in row]
        z[y] = s * (row[y] - m)
        expected.append(z)
    assert out.loss.item() == pytest.approx(_ce(expected, labels), rel=1e-5)

    # eval: same scale, margin 0
    loss.eval()
    out_eval = _run(loss, rows, labels)
    assert loss.live_stats()["margin"].item() == 0.0
    assert loss.live_stats()["scale"].item() == pytest.approx(s, rel=1e-5)
    assert out_eval.loss.item() == pytest.approx(_ce([[s * v for v in r] for r in rows], labels), rel=1e-5)


def test_madacos_scale_floor_and_margin_clamp():
    loss = _with_identity_weights(MadaCos(4, 4, rho=RHO)).train()
    rows = [[0.6, 0.8, 0.0, 0.0], [0.8, 0.6, 0.0, 0.0], [0.0, 0.0, 0.96, 0.28]]
    labels = [0, 0, 3]  # target cosines 0.6, 0.8, 0.28 → median 0.6 (sample 0)
    _run(loss, rows, labels)
    s = max(32.0, LOG_CONST / 0.4)
    b = math.exp(s * 0.8) + 2.0  # sample 0's negatives: 0.8, 0, 0
    assert 0.6 - math.log(b * RHO / (1 - RHO)) / s < 0  # → clamped
    assert loss.live_stats()["margin"].item() == 0.0
    rows_low = [[0.28, 0.96, 0.0, 0.0], [0.0, 0.0, 0.6, 0.8], [0.0, 0.96, 0.28, 0.0]]
    _run(loss, rows_low, [0, 2, 2])  # target cosines 0.28, 0.6, 0.28 → median 0.28
    assert LOG_CONST / (1 - 0.28) < 32
    assert loss.live_stats()["scale"].item() == pytest.approx(32.0)


def test_madacos_scale_margin_are_constants_in_backward():
    torch.manual_seed(1)
    loss = MadaCos(8, 5).train()
    e = torch.randn(6, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    loss(e, y).loss.backward()
    s, m = loss.live_stats()["scale"].item(), loss.live_stats()["margin"].item()
    e2 = e.detach().clone().requires_grad_(True)
    w2 = loss.weight.detach().clone().requires_grad_(True)
    cos = torch.nn.functional.normalize(e2) @ torch.nn.functional.normalize(w2).T
    z = s * (cos - m * torch.nn.functional.one_hot(y, 5))
    torch.nn.functional.cross_entropy(z, y).backward()
    assert torch.allclose(e.grad, e2.grad, atol=1e-5)
    assert torch.allclose(loss.weight.grad, w2.grad, atol=1e-5)


def test_median_index_lower_median_and_stable_ties():
    assert median_index(torch.tensor([0.9, 0.1, 0.5, 0.3])).item() == 3  # sorted 0.1 0.3 | 0.5 0.9
    assert median_index(torch.tensor([0.2, 0.7, 0.4])).item() == 2
    assert median_index(torch.tensor([0.5, 0.1, 0.5, 0.9])).item() == 0  # tie: earliest position
    # +inf entries are padding and do not count
    assert median_index(torch.tensor([0.9, 0.1, float("inf"), 0.5, float("inf")])).item() == 3


# --------------------------------------------------------------------- shared properties
def _all_losses(d=16, c=7):
    counts = torch.arange(1, c + 1) * 3
    return {name: build_loss(name, embedding_dim=d, num_classes=c, class_counts=counts) for name in LOSSES}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_reach_embeddings_and_class_weights(name):
    loss = _all_losses()[name].train()
    e = torch.randn(10, 16, requires_grad=True)
    y = torch.randint(0, 7, (10,))
    out = loss(e, y)
    assert out.loss.dim() == 0 and out.cosine.shape == (10, 7)
    assert not out.cosine.requires_grad
    out.loss.backward()
    assert e.grad is not None and e.grad.abs().sum() > 0
    assert loss.weight.grad is not None and loss.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_autocast_gives_fp32_cosines_and_finite_loss(name):
    loss = _all_losses()[name].train()
    e = torch.randn(12, 16)
    y = torch.randint(0, 7, (12,))
    reference = loss.cosine(e)
    for inputs in (e, e.bfloat16()):
        x = inputs.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = loss(x, y)
            cos = loss.cosine(x)
        assert out.cosine.dtype == torch.float32 and cos.dtype == torch.float32
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        if inputs.dtype == torch.float32:  # computed in fp32, not bf16 (bf16 error would be ~1e-2)
            assert torch.allclose(cos, reference, atol=1e-6)
        out.loss.backward()
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_live_stats_have_scale_and_margin(name):
    loss = _all_losses()[name].train()
    loss(torch.randn(4, 16), torch.tensor([0, 1, 2, 3]))
    stats = loss.live_stats()
    assert {"scale", "margin"} <= set(stats)
    for v in stats.values():
        assert math.isfinite(float(v))


def test_input_validation():
    loss = ArcFace(4, 3)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        loss(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must lie in"):
        loss(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels must have shape"):
        loss(torch.randn(2, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="margin m"):
        ArcFace(4, 3, m=-0.1)
    with pytest.raises(ValueError, match="rho"):
        MadaCos(4, 3, rho=1.5)


# ------------------------------------------------------------------------------ registry
def test_registry_builds_every_loss():
    assert available_losses() == sorted(
        ["arcface", "cosface", "curricularface", "subcenter_arcface", "dynamic_arcface", "madacos"]
    )
    kinds = {
        "arcface": ArcFace, "cosface": CosFace, "curricularface": CurricularFace,
        "subcenter_arcface": SubCenterArcFace, "dynamic_arcface": DynamicArcFace, "madacos": MadaCos,
    }
    for name, loss in _all_losses().items():
        assert type(loss) is kinds[name] and isinstance(loss, MarginLoss)
    sub = build_loss("SubCenter-ArcFace", embedding_dim=8, num_classes=5, k=4, s=16.0)
    assert sub.weight.shape == (20, 8) and sub.s == 16.0
    assert build_loss("madacos", embedding_dim=8, num_classes=5, rho=0.1).rho == 0.1
    # class_counts is accepted (and ignored) by losses that do not use it
    assert isinstance(build_loss("arcface", embedding_dim=8, num_classes=5, class_counts=torch.ones(5)), ArcFace)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown loss 'sphereface'.*arcface.*madacos"):
        build_loss("sphereface", embedding_dim=8, num_classes=5)
    with pytest.raises(ValueError, match="'rho'.*accepts: s, m, k"):
        build_loss("arcface", embedding_dim=8, num_classes=5, rho=0.1)
    with pytest.raises(ValueError, match="dynamic_arcface.*class_counts"):
        build_loss("dynamic_arcface", embedding_dim=8, num_classes=5)
