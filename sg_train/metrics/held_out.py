"""Accuracy and GAP on a held-out split, one prediction per sample, exact under DDP."""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn
from torchmetrics.utilities.data import dim_zero_cat

from .gap import global_average_precision

__all__ = ["HeldOutClassification"]


class HeldOutClassification(Metric):
    """Top-1 accuracy and GAP of the classifier over a held-out set, each sample counted once.

    Under DDP, Lightning's validation ``DistributedSampler`` gives every rank the same number of
    samples by repeating the first ones, so a plain concatenation over ranks scores those twice
    (and one process and two disagree). Every row therefore carries its sample's dataset index;
    :meth:`compute` gathers the rows of all ranks (torchmetrics' ``"cat"`` sync) and keeps the
    first row of each index (rank 0's before rank 1's). Repeats are the same image through the
    same model, so which copy is kept changes nothing beyond float rounding of the confidence.

    ``update(indices, pred_labels, confidences, targets)``, all ``(N,)``: ``indices`` long dataset
    index; ``pred_labels`` long predicted class (``-1``: no prediction); ``confidences`` float,
    the prediction's score (finite where predicted); ``targets`` long true class (``-1``: the
    sample shows no landmark). ``N`` may be 0 (a batch whose images were all unreadable): an
    empty update still gives this rank's states their dtypes for the gather.

    ``compute()`` returns ``{"acc": ..., "GAP": ...}``, 0-d fp64 tensors in [0, 1]:

    - ``acc``: the fraction of samples with a landmark whose predicted class is theirs
      (0, with a warning, when no sample has a landmark);
    - ``GAP``: :func:`~sg_train.metrics.gap.global_average_precision` over the kept rows.

    Raises ``ValueError`` when the four inputs differ in length (``update``), or when one index
    arrives with two different targets (``compute``): the indices then do not identify samples
    (e.g. two validation sets numbered from 0 each).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("indices", default=[], dist_reduce_fx="cat")
        self.add_state("pred_labels", default=[], dist_reduce_fx="cat")
        self.add_state("confidences", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, indices: Tensor, pred_labels: Tensor, confidences: Tensor, targets: Tensor) -> None:
        rows = (indices, pred_labels, confidences, targets)
        if len({t.numel() for t in rows}) != 1:
            raise ValueError(
                "indices, pred_labels, confidences and targets must have the same length, got "
                + ", ".join(str(t.numel()) for t in rows)
            )
        self.indices.append(indices.detach().reshape(-1).to(self.device, torch.long))
        self.pred_labels.append(pred_labels.detach().reshape(-1).to(self.device, torch.long))
        self.confidences.append(confidences.detach().reshape(-1).to(self.device, torch.float64))
        self.targets.append(targets.detach().reshape(-1).to(self.device, torch.long))

    def compute(self) -> dict[str, Tensor]:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        # After a DDP sync the states are tensors, before it (one process) lists of tensors.
        if isinstance(self.indices, list) and not self.indices:
            rank_zero_warn("HeldOutClassification.compute() called before any update; returning 0")
            return {"acc": zero, "GAP": zero}
        indices = dim_zero_cat(self.indices)
        targets = dim_zero_cat(self.targets)
        keep = _first_row_per_index(indices, targets)
        pred_labels, targets = dim_zero_cat(self.pred_labels)[keep], targets[keep]
        confidences = dim_zero_cat(self.confidences)[keep]
        with_landmark = targets >= 0
        if not bool(with_landmark.any()):
            rank_zero_warn("HeldOutClassification: no sample has a landmark; accuracy and GAP are 0")
            return {"acc": zero, "GAP": zero}
        correct = (pred_labels == targets) & with_landmark
        acc = correct.sum().to(torch.float64) / with_landmark.sum()
        return {"acc": acc, "GAP": global_average_precision(pred_labels, confidences, targets)}


def _first_row_per_index(indices: Tensor, targets: Tensor) -> Tensor:
    """Positions (long ``(U,)``) of the first row of each of the ``U`` distinct ``indices`` (``(N,)``).

    Raises ``ValueError`` naming the first index that comes with two different ``targets``.
    """
    order = torch.sort(indices, stable=True).indices
    indices, targets = indices[order], targets[order]
    repeat = indices[1:] == indices[:-1]
    clash = repeat & (targets[1:] != targets[:-1])
    if bool(clash.any()):
        i = int(clash.nonzero()[0])
        raise ValueError(
            f"HeldOutClassification: dataset index {int(indices[i])} arrived with targets {int(targets[i])} and "
            f"{int(targets[i + 1])}; the indices must identify samples (one validation set, numbered once)"
        )
    first = torch.cat([torch.ones(min(1, len(order)), dtype=torch.bool, device=order.device), ~repeat])
    return order[first]
