"""ArcFace, sub-centre ArcFace and ArcFace with per-class dynamic margins."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import OptionError

from .base import FixedMarginLoss, MarginLoss, _check_scale_margin
from .margins import arcface_target, dynamic_margins, replace_target, target_cosine

__all__ = ["ArcFace", "DynamicArcFace", "SubCenterArcFace"]


class ArcFace(FixedMarginLoss):
    """ArcFace (Deng et al., 2019).

    Target logit ``s·cos(θ_y + m)`` where ``cos θ_y > cos(π − m)``, else ``s·(cos θ_y − m·sin m)``;
    other logits ``s·cos θ_j``. Defaults s = 30, m = 0.15 (DELG / CFCD).
    """

    def __init__(
        self, embedding_dim: int, num_classes: int, s: float = 30.0, m: float = 0.15, k: int = 1
    ) -> None:
        super().__init__(embedding_dim, num_classes, s, m, k)

    def logits(self, cos: Tensor, labels: Tensor) -> Tensor:
        cos_y = target_cosine(cos, labels)
        return self.s * replace_target(cos, labels, arcface_target(cos_y, self.m))


class SubCenterArcFace(ArcFace):
    """Sub-centre ArcFace (Deng et al., 2020): k centres per class, ``cos θ_j`` = max over them.

    The weight has num_classes·k rows (class-major); default k = 3.
    """

    def __init__(
        self, embedding_dim: int, num_classes: int, s: float = 30.0, m: float = 0.15, k: int = 3
    ) -> None:
        super().__init__(embedding_dim, num_classes, s=s, m=m, k=k)


class DynamicArcFace(MarginLoss):
    """ArcFace with per-class dynamic margins (GLR 2021 winners).

    ``m_c = a·(n_c^(−1/4) − min)/(max − min) + b`` from the class image counts ``n_c``
    (a = 0.45, b = 0.05: rare classes get larger margins). The margins live in the buffer
    ``margins`` (C,), saved in checkpoints. Sub-centres are supported through ``k``.
    """

    margins: Tensor

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        class_counts: Tensor | list[int],
        s: float = 30.0,
        a: float = 0.45,
        b: float = 0.05,
        k: int = 1,
    ) -> None:
        _check_scale_margin(s)
        if a < 0 or b < 0:
            raise OptionError(f"dynamic margins need a ≥ 0 and b ≥ 0, got a={a}, b={b}")
        super().__init__(embedding_dim, num_classes, k)
        counts = torch.as_tensor(class_counts).flatten()
        if counts.numel() != num_classes:
            raise ValueError(
                f"class_counts has {counts.numel()} entries but num_classes={num_classes}"
            )
        self.s = float(s)
        self.a = float(a)
        self.b = float(b)
        self.register_buffer("margins", dynamic_margins(counts, a=a, b=b))

    def logits(self, cos: Tensor, labels: Tensor) -> Tensor:
        cos_y = target_cosine(cos, labels)
        m = self.margins.float()[labels]
        return self.s * replace_target(cos, labels, arcface_target(cos_y, m))

    def live_stats(self) -> dict[str, float | Tensor]:
        return {"scale": self.s, "margin": self.margins.mean().detach()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, a={self.a}, b={self.b}"
