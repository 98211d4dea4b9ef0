"""CosFace (large-margin cosine loss)."""
from __future__ import annotations

from torch import Tensor

from .base import FixedMarginLoss
from .margins import cosface_target, replace_target, target_cosine

__all__ = ["CosFace"]


class CosFace(FixedMarginLoss):
    """CosFace (Wang et al., 2018): target logit ``s·(cos θ_y − m)``, others ``s·cos θ_j``.

    Defaults s = 30, m = 0.35 (the paper's margin).
    """

    def __init__(
        self, embedding_dim: int, num_classes: int, s: float = 30.0, m: float = 0.35, k: int = 1
    ) -> None:
        super().__init__(embedding_dim, num_classes, s, m, k)

    def logits(self, cos: Tensor, labels: Tensor) -> Tensor:
        cos_y = target_cosine(cos, labels)
        return self.s * replace_target(cos, labels, cosface_target(cos_y, self.m))
