"""Global Average Precision (GAP, micro-AP at k = 1): the Kaggle Google Landmark Recognition metric."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["global_average_precision"]


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
    For the held-out split during training see :class:`~sg_train.metrics.held_out.HeldOutClassification`.
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
