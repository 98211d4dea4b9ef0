"""Global Average Precision (GAP, micro-AP at k = 1): the Kaggle Google Landmark Recognition metric."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn
from torchmetrics.utilities.data import dim_zero_cat

__all__ = ["GlobalAveragePrecision", "global_average_precision"]


def _as_long(x: Tensor | Sequence) -> Tensor:
    """A 1-D LongTensor; ``None`` entries of a Python sequence become -1."""
    if not isinstance(x, Tensor):
        x = torch.tensor([-1 if v is None else int(v) for v in x], dtype=torch.long)
    if x.is_floating_point():
        x = torch.nan_to_num(x, nan=-1.0)
    return x.reshape(-1).long()


def global_average_precision(pred_labels: Tensor, confidences: Tensor, targets: Tensor) -> Tensor:
    """``GAP = (1/M)·Σ_i P(i)·rel(i)`` over the predictions sorted by confidence, descending.

    - one prediction (label, confidence) per query; ``pred_labels < 0`` means the query got no
      prediction (it is not in the ranked list, but still counts in M if it has a landmark);
    - ``targets < 0`` marks a query without a landmark: its prediction is in the list and is
      always wrong, and the query is not counted in M;
    - ``P(i)`` is the precision over the first i predictions, ``rel(i)`` is 1 if the i-th
      prediction is correct; ``M`` = number of queries with a landmark.

    Ties in confidence are ranked with the wrong predictions first (pessimistic), which makes
    the value independent of input order (e.g. the order in which DDP ranks are gathered).
    Returns a 0-d fp64 tensor; 0 when M = 0.
    """
    pred_labels = pred_labels.reshape(-1).long()
    targets = targets.reshape(-1).long()
    confidences = confidences.reshape(-1).to(torch.float64)
    if not (pred_labels.shape == targets.shape == confidences.shape):
        raise ValueError(
            "pred_labels, confidences and targets must have the same length, got "
            f"{pred_labels.numel()}, {confidences.numel()}, {targets.numel()}"
        )
    m = int((targets >= 0).sum())
    if m == 0:
        return torch.zeros((), dtype=torch.float64, device=confidences.device)
    predicted = pred_labels >= 0
    if predicted.any() and not torch.isfinite(confidences[predicted]).all():
        raise ValueError("confidences of predicted queries must be finite")
    conf = confidences[predicted]
    rel = ((pred_labels == targets) & (targets >= 0))[predicted].to(torch.float64)
    # Lexicographic order (confidence descending, then wrong before right): two stable sorts.
    order = torch.sort(rel, stable=True).indices
    order = order[torch.sort(conf[order], descending=True, stable=True).indices]
    rel = rel[order]
    ranks = torch.arange(1, rel.numel() + 1, dtype=torch.float64, device=rel.device)
    precision = torch.cumsum(rel, 0) / ranks
    return (precision * rel).sum() / m


class GlobalAveragePrecision(Metric):
    """GAP as a torchmetrics Metric (states are concatenated lists, so it syncs under DDP).

    ``update(pred_labels, confidences, targets)``: (N,) predicted class, its confidence and
    the true class per query; ``targets`` may be -1 (or None in a Python list) for queries
    without a landmark, ``pred_labels`` may be -1 for queries without a prediction.
    ``compute()``: see :func:`global_average_precision`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("pred_labels", default=[], dist_reduce_fx="cat")
        self.add_state("confidences", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(
        self,
        pred_labels: Tensor | Sequence,
        confidences: Tensor | Sequence,
        targets: Tensor | Sequence,
    ) -> None:
        pred = _as_long(pred_labels).to(self.device)
        target = _as_long(targets).to(self.device)
        conf = torch.as_tensor(confidences).detach().reshape(-1).to(self.device, torch.float64)
        if not (pred.shape == target.shape == conf.shape):
            raise ValueError(
                "pred_labels, confidences and targets must have the same length, got "
                f"{pred.numel()}, {conf.numel()}, {target.numel()}"
            )
        self.pred_labels.append(pred)
        self.confidences.append(conf)
        self.targets.append(target)

    def compute(self) -> Tensor:
        # After a DDP sync the states are tensors, before it lists of tensors.
        if isinstance(self.targets, list) and len(self.targets) == 0:
            rank_zero_warn("GlobalAveragePrecision.compute() called before any update; returning 0")
            return torch.zeros((), dtype=torch.float64, device=self.device)
        targets = dim_zero_cat(self.targets)
        if int((targets >= 0).sum()) == 0:
            rank_zero_warn("GlobalAveragePrecision: no query has a landmark (M = 0); returning 0")
        return global_average_precision(
            dim_zero_cat(self.pred_labels), dim_zero_cat(self.confidences), targets
        )
