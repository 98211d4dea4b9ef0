"""Metrics that torchmetrics lacks (GAP for landmark recognition)."""
from .gap import GlobalAveragePrecision, global_average_precision

__all__ = ["GlobalAveragePrecision", "global_average_precision"]
