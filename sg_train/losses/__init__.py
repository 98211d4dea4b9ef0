"""Margin-based classification losses (docs/design.md §3), chosen by name through :func:`build_loss`."""
from .arcface import ArcFace, DynamicArcFace, SubCenterArcFace
from .base import MarginLoss, MarginOutput
from .cosface import CosFace
from .cosine import class_cosine
from .curricularface import CurricularFace
from .madacos import MadaCos
from .registry import LOSSES, available_losses, build_loss

__all__ = [
    "LOSSES",
    "ArcFace",
    "CosFace",
    "CurricularFace",
    "DynamicArcFace",
    "MadaCos",
    "MarginLoss",
    "MarginOutput",
    "SubCenterArcFace",
    "available_losses",
    "build_loss",
    "class_cosine",
]
