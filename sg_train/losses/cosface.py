"""CosFace (large-margin cosine loss)."""
from __future__ import annotations

from torch import Tensor

from .base import MarginLoss, _check_scale_margin
from .margins import cosface_target, replace_target

__all__ = ["CosFace"]


class CosFace(MarginLoss):
    """CosFace (Wang et al., 2018): target logit ``s·(cos θ_y − m)``, others ``s·cos θ_j``.

    Defaults s = 30, m = 0.35 (the paper's margin).
    """

    def __init__(
        self, embedding_dim: int, num_classes: int, s: float = 30.0, m: float = 0.35, k: int = 1
    ) -> None:
        _check_scale_margin(s, m)
        super().__init__(embedding_dim, num_classes, k)
        self.s = float(s)
        self.m = float(m)

    def logits(self, cos: Tensor, labels: Tensor) -> Tensor:
        cos_y = cos.gather(1, labels.view(-1, 1)).squeeze(1)
        return self.s * replace_target(cos, labels, cosface_target(cos_y, self.m))

    def live_stats(self) -> dict[str, float | Tensor]:
        return {"scale": self.s, "margin": self.m}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}"
