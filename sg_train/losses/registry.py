"""Name → margin loss registry, the single entry point used by configs."""
from __future__ import annotations

import inspect

from torch import Tensor

from ..errors import OptionError
from ..options import check_option_types

from .arcface import ArcFace, DynamicArcFace, SubCenterArcFace
from .base import MarginLoss
from .cosface import CosFace
from .curricularface import CurricularFace
from .madacos import MadaCos

__all__ = ["LOSSES", "available_losses", "build_loss"]

LOSSES: dict[str, type[MarginLoss]] = {
    "arcface": ArcFace,
    "cosface": CosFace,
    "curricularface": CurricularFace,
    "subcenter_arcface": SubCenterArcFace,
    "dynamic_arcface": DynamicArcFace,
    "madacos": MadaCos,
}

_BUILT_IN = {"embedding_dim", "num_classes", "class_counts"}


def available_losses() -> list[str]:
    """Names accepted by :func:`build_loss`."""
    return sorted(LOSSES)


def _options(cls: type[MarginLoss]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p != "self" and p not in _BUILT_IN]


def build_loss(
    name: str,
    *,
    embedding_dim: int,
    num_classes: int,
    class_counts: Tensor | None = None,
    **kwargs,
) -> MarginLoss:
    """Build a margin loss by name.

    ``name`` is case-insensitive, ``-`` and ``_`` are interchangeable. ``kwargs`` are the
    loss's own options (``s``, ``m``, ``k``, ``rho``, ...). ``class_counts`` (images per class,
    length num_classes) is required by ``dynamic_arcface`` and ignored by the others, so a
    caller may always pass it.

    Raises :class:`~sg_train.errors.OptionError` (a ValueError) for an unknown name (listing the
    valid ones), an option the loss does not take (naming it and listing the accepted ones), an
    option of the wrong type (e.g. the string ``"30"`` for ``s``; see :func:`check_option_types`),
    or dynamic margins without counts.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in LOSSES:
        raise OptionError(f"unknown loss {name!r}; valid losses: {', '.join(available_losses())}")
    cls = LOSSES[key]
    accepted = _options(cls)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise OptionError(
            f"loss {key!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(accepted) or '(none)'}"
        )
    check_option_types(f"loss {key!r}", cls.__init__, kwargs)
    if cls is DynamicArcFace:
        if class_counts is None:
            raise OptionError(
                "loss 'dynamic_arcface' needs class_counts (number of training images per "
                "class, length num_classes) to compute its per-class margins"
            )
        kwargs["class_counts"] = class_counts
    return cls(embedding_dim=embedding_dim, num_classes=num_classes, **kwargs)
