"""Multi-scale aggregation of per-scale descriptors (Scale-GeM, SuperGlobal).

All functions take the per-scale descriptors stacked as ``(S, B, D)`` (S scales) and return
``(B, D)``; the caller L2-normalises the result. They compute in float32.

- :func:`scale_gem_max` (the p -> inf limit, SuperGlobal's default):
  ``max_s  x_s / ||x_s||``, element-wise.
- :func:`scale_gem_finite`: ``( mean_s (x_s - g)^p )^(1/p) + g`` with ``g = min`` of the
  image's values over all scales and dimensions, p = 10 by default. The shift makes the
  base non-negative. (The published code takes the min over the whole stacked tensor, i.e.
  also over the batch; it extracts one image at a time, where both agree. Per image keeps
  batched extraction equal to one-by-one.)
- :func:`scale_mean`: plain mean over scales, what the published code does when S-GeM is
  switched off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["scale_gem_max", "scale_gem_finite", "scale_mean", "stack_scales"]


def stack_scales(descriptors: Tensor | list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Accept a list of ``(B, D)`` tensors or an ``(S, B, D)`` tensor; return ``(S, B, D)`` float32."""
    x = torch.stack(list(descriptors), 0) if isinstance(descriptors, (list, tuple)) else descriptors
    if x.ndim != 3 or x.shape[0] == 0:
        raise ValueError(f"expected per-scale descriptors of shape (S, B, D) with S >= 1, got {tuple(x.shape)}")
    return x.float()


def scale_gem_max(descriptors: Tensor | list[Tensor]) -> Tensor:
    """Element-wise max over scales of the L2-normalised per-scale descriptors."""
    x = stack_scales(descriptors)
    return F.normalize(x, p=2, dim=-1).amax(dim=0)


def scale_gem_finite(descriptors: Tensor | list[Tensor], p: float = 10.0) -> Tensor:
    """``((x - g)^p).mean(scales)^(1/p) + g`` with g the per-image minimum over scales and dims."""
    if p <= 0:
        raise ValueError(f"Scale-GeM p must be > 0, got {p}")
    x = stack_scales(descriptors)
    gamma = x.amin(dim=(0, 2), keepdim=True)  # (1, B, 1)
    return (x - gamma).pow(p).mean(dim=0).pow(1.0 / p) + gamma[0]


def scale_mean(descriptors: Tensor | list[Tensor]) -> Tensor:
    """Mean over scales (no per-scale normalisation)."""
    return stack_scales(descriptors).mean(dim=0)
