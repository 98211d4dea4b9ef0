"""Regional-GeM (SuperGlobal): a local k x k GeM mixed 50/50 with the map itself.

    R(x) = 0.5 * LPPool2d(p, k, stride=1)( pad(x) / (k^2)^(1/p) ) + 0.5 * x
         = 0.5 * ( mean_{k x k window} x^p )^(1/p)              + 0.5 * x

``pad`` is a reflection pad of (k-1)/2 on every side, so the map keeps its size. It is
applied to the last feature map, before the global pooling.

Small maps: a reflection pad of (k-1)/2 needs every spatial side >= (k-1)/2 + 1 (3 for
k = 5; the published code crashes below that, e.g. a 1 x 1 map from a 32 px image). For a
map with a side that short we pad by *replication* instead (the edge value repeated), which
is defined for any size; maps large enough for reflection are unchanged.

The window power is taken on ``max(x, eps)`` (like GeM): for non-negative maps this differs
from the published formula only in windows that are entirely below eps (there it gives eps
instead of 0), and it keeps the gradient finite there (the published LPPool2d gives NaN
gradients for an all-zero window). Computed in float32.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import OptionError

from .gem import GEM_EPS

__all__ = ["regional_gem", "RegionalGeM"]


def _check_options(p: float, kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise OptionError(f"Regional-GeM kernel_size must be odd and >= 1, got {kernel_size}")
    if p <= 0:
        raise OptionError(f"Regional-GeM p must be > 0, got {p}")


def regional_gem(x: Tensor, p: float = 2.5, kernel_size: int = 5, eps: float = GEM_EPS) -> Tensor:
    """Regional-GeM of an NCHW map; returns a map of the same shape (float32)."""
    if x.ndim != 4:
        raise ValueError(f"regional_gem expects an NCHW map, got shape {tuple(x.shape)}")
    _check_options(p, kernel_size)
    x = x.float()
    pad = (kernel_size - 1) // 2
    powered = x.clamp(min=eps).pow(p)
    if pad:
        mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
        powered = F.pad(powered, (pad, pad, pad, pad), mode=mode)
    local = F.avg_pool2d(powered, kernel_size, stride=1).pow(1.0 / p)
    return 0.5 * local + 0.5 * x


class RegionalGeM(nn.Module):
    """Module form of :func:`regional_gem` (p = 2.5, 5 x 5 window by default; no parameters)."""

    def __init__(self, p: float = 2.5, kernel_size: int = 5, eps: float = GEM_EPS) -> None:
        super().__init__()
        _check_options(p, kernel_size)
        self.p = float(p)
        self.kernel_size = int(kernel_size)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return regional_gem(x, self.p, self.kernel_size, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p}, kernel_size={self.kernel_size}"
