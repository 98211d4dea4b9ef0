"""Pure tensor functions behind the margin losses (no modules, no state).

Notation (docs/design.md §3): ``cos θ_j`` is the cosine between an L2-normalised embedding and the
L2-normalised weight of class ``j``; ``y`` is the sample's label; ``s`` the scale, ``m`` the
margin. Every function here expects fp32 inputs; the modules call them with autocast off.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "arcface_target",
    "cosface_target",
    "curricular_hard_negatives",
    "dynamic_margins",
    "madacos_log_b",
    "madacos_margin",
    "madacos_scale",
    "median_index",
    "replace_target",
    "sin_from_cos",
    "target_cosine",
]

# Floor under 1 - cos² before the square root: d/dc sqrt(1 - c²) is infinite at |c| = 1.
_SIN_EPS = 1e-7


def sin_from_cos(cos: Tensor) -> Tensor:
    """``sin θ = sqrt(1 − cos²θ)`` for θ in [0, π], with a tiny floor keeping the gradient finite."""
    return (1.0 - cos * cos).clamp(min=_SIN_EPS).sqrt()


def arcface_target(cos_y: Tensor, m: float | Tensor) -> Tensor:
    """ArcFace target cosine.

    ``cos(θ_y + m) = cos θ_y·cos m − sin θ_y·sin m`` where ``cos θ_y > cos(π − m)`` (i.e.
    θ_y + m < π, where cos(θ + m) is still decreasing in θ), else the linear fallback
    ``cos θ_y − m·sin m``. ``m`` is a float or a tensor broadcastable to ``cos_y`` (per-sample
    margins for dynamic margins).
    """
    m_t = torch.as_tensor(m, dtype=cos_y.dtype, device=cos_y.device)
    cos_m, sin_m = torch.cos(m_t), torch.sin(m_t)
    shifted = cos_y * cos_m - sin_from_cos(cos_y) * sin_m
    threshold = torch.cos(math.pi - m_t)
    return torch.where(cos_y > threshold, shifted, cos_y - m_t * sin_m)


def cosface_target(cos_y: Tensor, m: float | Tensor) -> Tensor:
    """CosFace target cosine: ``cos θ_y − m``."""
    return cos_y - m


def curricular_hard_negatives(cos: Tensor, cos_y_plus_m: Tensor, t: Tensor | float) -> Tensor:
    """CurricularFace modulation of the negatives.

    Every entry with ``cos θ_j > cos(θ_y + m)`` becomes ``cos θ_j·(t + cos θ_j)``; the others
    are unchanged. ``cos_y_plus_m`` is the raw ``cos θ_y·cos m − sin θ_y·sin m`` (B,), without
    the ArcFace fallback, as in the CurricularFace paper and code. The target column also
    satisfies the mask: the caller overwrites it with the target logit afterwards.
    """
    hard = cos > cos_y_plus_m.unsqueeze(1)
    return torch.where(hard, cos * (t + cos), cos)


def target_cosine(cos: Tensor, labels: Tensor) -> Tensor:
    """``cos θ_y`` of each sample: entry ``[i, labels[i]]`` of ``cos`` (B, C), shape (B,)."""
    return cos.gather(1, labels.view(-1, 1)).squeeze(1)


def replace_target(cos: Tensor, labels: Tensor, target: Tensor) -> Tensor:
    """Copy of ``cos`` (B, C) whose entry ``[i, labels[i]]`` is ``target[i]`` (differentiable)."""
    onehot = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, labels.view(-1, 1), True)
    return torch.where(onehot, target.unsqueeze(1).to(cos.dtype), cos)


def dynamic_margins(class_counts: Tensor, a: float = 0.45, b: float = 0.05) -> Tensor:
    """Per-class margins of the GLR 2021 winners: ``m_c = a·(n_c^(−1/4) − min)/(max − min) + b``.

    ``min``/``max`` are taken over ``n_c^(−1/4)`` of all classes, so the rarest class gets
    ``a + b`` and the most frequent ``b``. Classes with zero images are treated as having one
    (their margin is irrelevant: they never appear as a target). If every class has the same
    count the range is empty; every class then gets the midpoint ``b + a/2``.
    Returns fp32 margins of shape (C,).
    """
    counts = torch.as_tensor(class_counts).detach().to(torch.float64).flatten()
    if counts.numel() == 0:
        raise ValueError("class_counts is empty")
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("class_counts must be finite and non-negative")
    x = counts.clamp(min=1.0).pow(-0.25)
    lo, hi = x.min(), x.max()
    if hi - lo <= 0:
        return torch.full_like(x, b + a / 2).float()
    return (a * (x - lo) / (hi - lo) + b).float()


def median_index(values: Tensor) -> Tensor:
    """Index of the median element of a 1-D tensor (0-d LongTensor, no host sync).

    For an even count this is the *lower* median, the element at sorted position
    ``(n − 1)//2`` — the convention of ``torch.median``, which the published MadaCos code
    uses. Ties are broken by position (stable sort): the earliest tied element wins, so the
    choice depends only on the values in their concatenated order. ``+inf`` entries are padding
    and are not counted.
    """
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"median_index expects a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    order = torch.sort(values, stable=True).indices
    n_valid = torch.isfinite(values).sum()
    k = ((n_valid - 1).clamp(min=0) // 2).to(torch.long)
    return order[k]


def madacos_scale(median_cos: Tensor, rho: float, min_scale: float = 32.0) -> Tensor:
    """MadaCos scale: ``s = max(min_scale, ln(9999999·(1 − ρ)/ρ) / (1 − c̃))``.

    ``1 − c̃`` is floored at 1e-6 so that a collapsed batch (c̃ = 1) gives a huge but finite s.
    """
    numerator = math.log(9999999.0 * (1.0 - rho) / rho)
    s = numerator / (1.0 - median_cos).clamp(min=1e-6)
    return s.clamp(min=min_scale)


def madacos_log_b(cos_row: Tensor, label: Tensor | int, s: Tensor | float) -> Tensor:
    """``ln B`` with ``B = Σ_{j≠y} exp(s·cos θ_j)`` for one sample, as a log-sum-exp.

    Computing ``ln B`` instead of ``B`` is the same number without the fp32 overflow that
    ``exp(s·cos)`` reaches for s ≳ 90.
    """
    z = cos_row * s
    mask = torch.zeros_like(z, dtype=torch.bool)
    mask[label] = True
    return torch.logsumexp(z.masked_fill(mask, float("-inf")), dim=0)


def madacos_margin(median_cos: Tensor, log_b: Tensor, s: Tensor, rho: float) -> Tensor:
    """MadaCos margin: ``m = c̃ − ln(B·ρ/(1 − ρ))/s``, clamped at 0."""
    m = median_cos - (log_b + math.log(rho / (1.0 - rho))) / s
    return m.clamp(min=0.0)
