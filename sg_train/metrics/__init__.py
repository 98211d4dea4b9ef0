"""Metrics that torchmetrics lacks: GAP for landmark recognition, and held-out accuracy + GAP
that count each sample once under DDP."""
from .gap import global_average_precision
from .held_out import HeldOutClassification

__all__ = ["HeldOutClassification", "global_average_precision"]
