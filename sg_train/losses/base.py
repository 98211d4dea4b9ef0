"""Base class of the margin-based classification losses."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import OptionError

from .cosine import class_cosine

__all__ = ["FixedMarginLoss", "MarginLoss", "MarginOutput"]


class MarginOutput(NamedTuple):
    """What a margin loss returns.

    ``loss``: scalar fp32 cross-entropy over the margin logits (differentiable).
    ``cosine``: (B, num_classes) fp32 cosines *without* margin (max over sub-centres),
    detached — for top-1 accuracy / GAP.
    """

    loss: Tensor
    cosine: Tensor


class MarginLoss(nn.Module):
    """Cross-entropy over scaled, margin-adjusted cosines to learnable class weights.

    Holds ``weight``, a Parameter of shape (num_classes·k, embedding_dim) (k sub-centres per
    class, rows class-major), initialised with xavier-uniform rows. Subclasses implement
    :meth:`logits` (fp32 cosines (B, C) → fp32 logits (B, C), scale included). Cosines and
    logits are always fp32 with autocast off, whatever the surrounding precision.
    """

    def __init__(self, embedding_dim: int, num_classes: int, k: int = 1) -> None:
        super().__init__()
        if embedding_dim < 1 or num_classes < 1 or k < 1:
            raise OptionError(
                f"embedding_dim, num_classes and k must be ≥ 1 "
                f"(got {embedding_dim}, {num_classes}, {k})"
            )
        self.embedding_dim = int(embedding_dim)
        self.num_classes = int(num_classes)
        self.k = int(k)
        self.weight = nn.Parameter(torch.empty(self.num_classes * self.k, self.embedding_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)

    # -- public API -----------------------------------------------------------------------
    def cosine(self, embeddings: Tensor) -> Tensor:
        """(B, D) embeddings → (B, num_classes) fp32 cosines, no margin (max over sub-centres)."""
        self._check_embeddings(embeddings)
        return class_cosine(embeddings, self.weight, self.k)

    def forward(self, embeddings: Tensor, labels: Tensor) -> MarginOutput:
        cos = self.cosine(embeddings)
        self._check_labels(labels, embeddings.shape[0])
        labels = labels.long()
        with torch.autocast(device_type=cos.device.type, enabled=False):
            logits = self.logits(cos, labels)
            loss = F.cross_entropy(logits.float(), labels)
        return MarginOutput(loss=loss, cosine=cos.detach())

    def logits(self, cos: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def live_stats(self) -> dict[str, float | Tensor]:
        """The loss's current scale/margin (and other live values), for logging."""
        return {}

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k > 1 else ""
        return f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}{k}"

    # -- checks ---------------------------------------------------------------------------
    def _check_embeddings(self, embeddings: Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"{type(self).__name__} expects embeddings of shape (B, {self.embedding_dim}), "
                f"got {tuple(embeddings.shape)}"
            )

    def _check_labels(self, labels: Tensor, batch: int) -> None:
        if labels.dim() != 1 or labels.shape[0] != batch:
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        # Range check only where it costs no device sync; CUDA asserts on its own.
        if labels.device.type == "cpu" and labels.numel() > 0:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"labels must lie in [0, {self.num_classes}), got values in [{lo}, {hi}]"
                )


def _check_scale_margin(s: float, m: float | None = None) -> None:
    if not (math.isfinite(s) and s > 0):
        raise OptionError(f"scale s must be a positive number, got {s}")
    if m is not None and not (math.isfinite(m) and 0 <= m < math.pi):
        raise OptionError(f"margin m must lie in [0, π), got {m}")


class FixedMarginLoss(MarginLoss):
    """A margin loss with a fixed scale ``s`` and margin ``m`` (ArcFace, CosFace, CurricularFace)."""

    def __init__(self, embedding_dim: int, num_classes: int, s: float, m: float, k: int = 1) -> None:
        _check_scale_margin(s, m)
        super().__init__(embedding_dim, num_classes, k)
        self.s = float(s)
        self.m = float(m)

    def live_stats(self) -> dict[str, float | Tensor]:
        return {"scale": self.s, "margin": self.m}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}"
