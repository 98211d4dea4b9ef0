"""MadaCos (CFCD, ICCV 2023): scale and margin adapted to the global batch's median cosine."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import OptionError

from .base import MarginLoss
from .distributed import distributed_world, gather_padded
from .margins import madacos_log_b, madacos_margin, madacos_scale, median_index, replace_target, target_cosine

__all__ = ["MadaCos"]


class MadaCos(MarginLoss):
    """MadaCos: a CosFace-style loss whose scale and margin follow the batch statistics.

    With ρ (0.02 in the CFCD configs) and c̃ = the median target cosine over the **global**
    batch (all ranks)::

        s = max(32, ln(9999999·(1 − ρ)/ρ) / (1 − c̃))
        B = Σ_{j≠y} exp(s·cos θ_j)          for the median sample
        m = max(0, c̃ − ln(B·ρ/(1 − ρ))/s)  (m = 0 in eval mode)
        logits: s·(cos θ_y − m) for the target, s·cos θ_j otherwise

    s and m are computed under no_grad and act as constants in the backward pass (the CFCD
    code's backward likewise passes ``grad·s`` only).

    Choices where the paper is silent, following the published CFCD code
    (``core/model/madacos.py``):

    - "Median" is ``torch.median``'s: for an even global batch the *lower* median, the
      element at sorted position ``(n − 1)//2``. The median sample is that element; ties go to
      the earliest position in the rank-ordered concatenation of the per-rank batches (so one
      process on the concatenated batch picks the same sample).
    - B is the median sample's own sum over its negatives, computed with the global s on the
      rank that holds it and shared with the others (an all-reduce of one number; CFCD
      all-gathers every sample's B and indexes it — the same value).
    - B is handled as ``ln B`` (log-sum-exp): identical, without the fp32 overflow of
      ``exp(s·cos)`` for large s.
    - Under DDP the target cosines are all-gathered (detached) with padding, so per-rank
      batch sizes may differ (CFCD's code assumes equal sizes). Set ``gather=False`` to use
      the local batch only (e.g. when the loss is called on a subset of ranks).
    - In eval mode s is still computed from the batch and m is 0, as in CFCD.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        rho: float = 0.02,
        min_scale: float = 32.0,
        gather: bool = True,
        k: int = 1,
    ) -> None:
        if not 0.0 < rho < 1.0:
            raise OptionError(f"MadaCos rho must lie in (0, 1), got {rho}")
        if not (math.isfinite(min_scale) and min_scale > 0):
            raise OptionError(f"min_scale must be a positive number, got {min_scale}")
        super().__init__(embedding_dim, num_classes, k)
        self.rho = float(rho)
        self.min_scale = float(min_scale)
        self.gather = bool(gather)
        self._last: dict[str, Tensor] = {}

    @torch.no_grad()
    def scale_margin(self, cos: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(s, m, c̃) for fp32 cosines (B, C) and labels (B,), over the global batch.

        Collective under DDP (when ``gather``): every rank must call it at the same step.
        """
        cos = cos.detach().float()
        cos_y = target_cosine(cos, labels)
        rank, world = distributed_world() if self.gather else (0, 1)
        if world > 1:
            all_cos_y, n_max = gather_padded(cos_y)
        else:
            all_cos_y, n_max = cos_y, cos_y.shape[0]
        idx = median_index(all_cos_y)
        median_cos = all_cos_y[idx]
        s = madacos_scale(median_cos, self.rho, self.min_scale)

        n_local = cos.shape[0]
        if n_local > 0:
            local = (idx - rank * n_max).clamp(0, n_local - 1)
            log_b = madacos_log_b(cos[local], labels[local], s)
            if world > 1:
                owner = (idx // n_max) == rank
                log_b = torch.where(owner, log_b, torch.zeros_like(log_b))
        else:
            log_b = torch.zeros((), dtype=cos.dtype, device=cos.device)
        if world > 1:
            dist.all_reduce(log_b, op=dist.ReduceOp.SUM)

        m = madacos_margin(median_cos, log_b, s, self.rho)
        if not self.training:
            m = torch.zeros_like(m)
        return s, m, median_cos

    def logits(self, cos: Tensor, labels: Tensor) -> Tensor:
        s, m, median_cos = self.scale_margin(cos, labels)
        self._last = {"scale": s, "margin": m, "median_cosine": median_cos}
        cos_y = target_cosine(cos, labels)
        return s * replace_target(cos, labels, cos_y - m)

    def live_stats(self) -> dict[str, float | Tensor]:
        """Scale, margin and median target cosine of the last forward ({} before the first)."""
        return dict(self._last)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rho={self.rho}, min_scale={self.min_scale}"
