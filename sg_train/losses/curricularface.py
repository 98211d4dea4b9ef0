"""CurricularFace (Huang et al., CVPR 2020)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import OptionError

from .base import FixedMarginLoss
from .margins import arcface_target, curricular_hard_negatives, replace_target, sin_from_cos, target_cosine

__all__ = ["CurricularFace"]


class CurricularFace(FixedMarginLoss):
    """CurricularFace: ArcFace target plus an adaptive curriculum on hard negatives.

    - target logit: ArcFace's, ``s·cos(θ_y + m)`` or the fallback ``s·(cos θ_y − m·sin m)``
      where ``cos θ_y ≤ cos(π − m)``;
    - negatives with ``cos θ_j > cos(θ_y + m)`` become ``s·cos θ_j·(t + cos θ_j)``,
      the others stay ``s·cos θ_j``;
    - ``t`` is a buffer (saved in checkpoints) starting at 0 and, in training mode only,
      updated under no_grad as ``t ← 0.01·mean(cos θ_y) + 0.99·t`` over the local batch.

    Order within a step follows the authors' code: t is updated first, then the updated t
    modulates this step's hard negatives. Under DDP each rank updates t from its own batch;
    Lightning's DDP (broadcast_buffers=True) re-syncs buffers from rank 0 at every forward.
    DELG/CFCD train it with s = 30, m = 0.15 (the defaults).
    """

    t: Tensor

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float = 30.0,
        m: float = 0.15,
        momentum: float = 0.01,
        k: int = 1,
    ) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise OptionError(f"momentum must lie in [0, 1], got {momentum}")
        super().__init__(embedding_dim, num_classes, s, m, k)
        self.momentum = float(momentum)
        self.register_buffer("t", torch.zeros(()))

    def logits(self, cos: Tensor, labels: Tensor) -> Tensor:
        cos_y = target_cosine(cos, labels)
        cos_y_plus_m = cos_y * math.cos(self.m) - sin_from_cos(cos_y) * math.sin(self.m)
        if self.training and cos_y.numel() > 0:
            with torch.no_grad():
                self.t.mul_(1.0 - self.momentum).add_(self.momentum * cos_y.detach().mean())
        t = self.t.detach().float()
        negatives = curricular_hard_negatives(cos, cos_y_plus_m, t)
        return self.s * replace_target(negatives, labels, arcface_target(cos_y, self.m))

    def live_stats(self) -> dict[str, float | Tensor]:
        return {**super().live_stats(), "t": self.t.detach()}
