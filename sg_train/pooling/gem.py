"""Generalised-mean pooling: GeM (learnable p, or fixed with ``learnable=False``) and GeM+ (fixed p).

    f_c = ( mean_{h,w} max(x_chw, eps)^p )^(1/p)

p = 1 is average pooling, p -> inf is max pooling. The map is clamped at ``eps`` first, so
the power is defined for any input and its gradient stays finite. The computation runs in
float32 whatever the input dtype (x^p overflows or underflows in half precision).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import OptionError

__all__ = ["gem", "GeM", "GeMPlus", "GEM_EPS", "GEMP_EPS"]

#: clamp of the learnable GeM (the value CVNet's GeneralizedMeanPoolingP uses)
GEM_EPS = 1e-6
#: clamp of GeM+ (the value SuperGlobal's ``gemp`` uses)
GEMP_EPS = 1e-8


def gem(x: Tensor, p: float | Tensor = 3.0, eps: float = GEM_EPS) -> Tensor:
    """Generalised mean over the spatial dims of an NCHW map: ``(B, C, H, W) -> (B, C)``.

    ``p`` may be a Python float or a tensor (broadcast against ``(B, C)``, e.g. shape ``(1,)``),
    so a learnable p receives a gradient.
    """
    if x.ndim != 4:
        raise ValueError(f"gem expects an NCHW map, got shape {tuple(x.shape)}")
    if isinstance(p, Tensor):
        p = p.float()
    return x.float().clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling, clamp ``eps`` = 1e-6, with a learnable exponent ``p`` (a parameter of shape
    ``(1,)``, init 3) or, with ``learnable=False``, a fixed one.

    Learnable: keep ``p`` out of weight decay (it is 1-d, so the usual "no decay on 1-d parameters"
    rule already does). Fixed: ``p`` is a Python float, not a parameter or buffer (no state-dict
    key, nothing for an optimizer to move), as in CFCD's published stage-1 model
    (``GeneralizedMeanPooling(norm=3.0)``, clamp 1e-6). The same formula as :class:`GeMPlus`, whose
    clamp is SuperGlobal's 1e-8.
    """

    def __init__(self, p: float = 3.0, eps: float = GEM_EPS, *, learnable: bool = True) -> None:
        super().__init__()
        if p <= 0:
            raise OptionError(f"GeM p must be > 0, got {p}")
        self.learnable = bool(learnable)
        self.p: nn.Parameter | float = nn.Parameter(torch.full((1,), float(p))) if self.learnable else float(p)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, self.p, self.eps)

    def p_value(self) -> float:
        """The exponent as a float (the current value of a learnable p)."""
        return float(self.p.detach().reshape(-1)[0]) if isinstance(self.p, Tensor) else self.p

    def extra_repr(self) -> str:
        if self.learnable:
            return f"p={self.p_value():.4f} (learnable), eps={self.eps}"
        return f"p={self.p} (fixed), eps={self.eps}"  # the exact value: descriptor caches fingerprint the repr


class GeMPlus(nn.Module):
    """GeM+ (SuperGlobal): GeM with a fixed exponent, by default p = 4.6. No parameters."""

    def __init__(self, p: float = 4.6, eps: float = GEMP_EPS) -> None:
        super().__init__()
        if p <= 0:
            raise OptionError(f"GeM+ p must be > 0, got {p}")
        self.p = float(p)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p} (fixed), eps={self.eps}"
