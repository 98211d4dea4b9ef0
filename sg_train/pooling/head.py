"""Pooling heads chosen by a one-line spec, e.g. ``"gem"``, ``"rgem+gemp"``, ``"rgem+gemp+sgem"``.

Grammar (names joined by ``+``, case and surrounding spaces ignored, each name at most once)::

    spec     := ["rgem" "+"] pooling ["+" "sgem"]
    pooling  := "gem" | "gemp" | "avg" | "max" | <a name added with register_pooling>

- ``gem``  : GeM with learnable p (init ``gem_p`` = 3), or fixed at ``gem_p`` with
  ``gem_p_learnable=False`` (CFCD's stage-1 GeM)
- ``gemp`` : GeM+ with fixed p (``gemp_p`` = 4.6)
- ``avg`` / ``max`` : global average / max pooling
- ``rgem`` : Regional-GeM (``rgem_p`` = 2.5, ``rgem_kernel`` = 5) on the map before pooling
- ``sgem`` : Scale-GeM for multi-scale extraction, ``sgem="max"`` (max over L2-normalised
  per-scale descriptors) or ``sgem="finite"`` (``sgem_p`` = 10). Without ``sgem`` the
  per-scale descriptors are averaged (what the published SuperGlobal code does with S-GeM
  switched off). With a single scale all three give the same final descriptor.

:class:`PoolingHead` maps a ``(B, C, H, W)`` map to ``(B, C)`` and aggregates per-scale
descriptors with :meth:`PoolingHead.aggregate_scales`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping

from torch import Tensor, nn

from ..errors import OptionError

from .gem import GeM, GeMPlus
from .regional_gem import RegionalGeM
from .scale_gem import scale_gem_finite, scale_gem_max, scale_mean

__all__ = [
    "HeadSpec",
    "PoolingHead",
    "parse_head_spec",
    "register_pooling",
    "available_poolings",
    "SCALE_GEM_MODES",
]

PoolingFactory = Callable[[Mapping[str, float]], nn.Module]


class _AdaptivePool(nn.Module):
    """Global average or max pooling, ``(B, C, H, W) -> (B, C)``."""

    def __init__(self, kind: Literal["avg", "max"]) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1)) if self.kind == "avg" else x.amax(dim=(-2, -1))

    def extra_repr(self) -> str:
        return self.kind


_POOLINGS: dict[str, PoolingFactory] = {
    "gem": lambda o: GeM(p=o["gem_p"], learnable=o["gem_p_learnable"]),
    "gemp": lambda o: GeMPlus(p=o["gemp_p"]),
    "avg": lambda o: _AdaptivePool("avg"),
    "max": lambda o: _AdaptivePool("max"),
}
_REGIONAL = "rgem"
_SCALE = "sgem"
SCALE_GEM_MODES = ("max", "finite")


def available_poolings() -> list[str]:
    """Names usable as the global pooling of a head spec."""
    return sorted(_POOLINGS)


def register_pooling(name: str, factory: PoolingFactory) -> None:
    """Add a global pooling: ``factory(options)`` returns a module mapping NCHW to ``(B, C)``.

    ``options`` holds the head's keyword options (``gem_p``, ``gem_p_learnable``, ``gemp_p``, ...).
    """
    key = name.strip().lower()
    if not key or "+" in key:
        raise ValueError(f"invalid pooling name {name!r}")
    if key in _POOLINGS or key in (_REGIONAL, _SCALE):
        raise ValueError(f"pooling name {key!r} is already taken")
    _POOLINGS[key] = factory


def _valid_names() -> str:
    return ", ".join([_REGIONAL, *available_poolings(), _SCALE])


@dataclass(frozen=True)
class HeadSpec:
    """A parsed head spec: one global pooling, optional R-GeM in front, optional S-GeM."""

    pooling: str
    regional: bool = False
    scale_gem: bool = False

    def __str__(self) -> str:
        parts = ([_REGIONAL] if self.regional else []) + [self.pooling] + ([_SCALE] if self.scale_gem else [])
        return "+".join(parts)


def parse_head_spec(spec: str | HeadSpec) -> HeadSpec:
    """Parse ``"rgem+gemp+sgem"``-style specs; :class:`~sg_train.errors.OptionError` (a ValueError)
    naming the valid names otherwise."""
    if isinstance(spec, HeadSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise OptionError(f"head spec must be a non-empty string such as 'rgem+gemp+sgem', got {spec!r}")
    names = [n.strip().lower() for n in spec.split("+")]
    if "" in names:
        raise OptionError(f"head spec {spec!r} has an empty name; join names with a single '+'")
    unknown = [n for n in names if n not in _POOLINGS and n not in (_REGIONAL, _SCALE)]
    if unknown:
        raise OptionError(f"unknown head name(s) {unknown} in {spec!r}; valid names: {_valid_names()}")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise OptionError(f"head spec {spec!r} repeats {duplicated}")
    poolings = [n for n in names if n in _POOLINGS]
    if len(poolings) != 1:
        raise OptionError(
            f"head spec {spec!r} needs exactly one global pooling out of {available_poolings()}, got {poolings}"
        )
    pooling = poolings[0]
    where = names.index(pooling)
    if _REGIONAL in names and names.index(_REGIONAL) > where:
        raise OptionError(f"head spec {spec!r}: 'rgem' works on the map, so it goes before {pooling!r}")
    if _SCALE in names and names.index(_SCALE) < where:
        raise OptionError(f"head spec {spec!r}: 'sgem' aggregates descriptors, so it goes after {pooling!r}")
    return HeadSpec(pooling=pooling, regional=_REGIONAL in names, scale_gem=_SCALE in names)


class PoolingHead(nn.Module):
    """``(B, C, H, W) -> (B, C)``: optional Regional-GeM, then the global pooling.

    Attributes: ``spec`` (:class:`HeadSpec`), ``regional`` (RegionalGeM or None), ``pool``.
    """

    def __init__(
        self,
        spec: str | HeadSpec = "gem",
        *,
        gem_p: float = 3.0,
        gem_p_learnable: bool = True,
        gemp_p: float = 4.6,
        rgem_p: float = 2.5,
        rgem_kernel: int = 5,
        sgem: Literal["max", "finite"] = "max",
        sgem_p: float = 10.0,
    ) -> None:
        super().__init__()
        self.spec = parse_head_spec(spec)
        if sgem not in SCALE_GEM_MODES:
            raise OptionError(f"sgem must be one of {SCALE_GEM_MODES}, got {sgem!r}")
        if sgem_p <= 0:
            raise OptionError(f"sgem_p must be > 0, got {sgem_p}")
        self.sgem_mode = sgem
        self.sgem_p = float(sgem_p)
        self.regional = RegionalGeM(p=rgem_p, kernel_size=rgem_kernel) if self.spec.regional else None
        options = {"gem_p": gem_p, "gem_p_learnable": bool(gem_p_learnable), "gemp_p": gemp_p, "rgem_p": rgem_p,
                   "rgem_kernel": rgem_kernel}
        self.pool = _POOLINGS[self.spec.pooling](options)

    def forward(self, x: Tensor) -> Tensor:
        if self.regional is not None:
            x = self.regional(x)
        return self.pool(x)

    def aggregate_scales(self, descriptors: Tensor | list[Tensor]) -> Tensor:
        """Per-scale descriptors ``(S, B, D)`` (or a list of ``(B, D)``) to ``(B, D)``, not normalised."""
        if not self.spec.scale_gem:
            return scale_mean(descriptors)
        if self.sgem_mode == "max":
            return scale_gem_max(descriptors)
        return scale_gem_finite(descriptors, self.sgem_p)

    def extra_repr(self) -> str:
        scale = f"sgem={self.sgem_mode}" + (f" (p={self.sgem_p})" if self.sgem_mode == "finite" else "")
        return f"spec={str(self.spec)!r}, " + (scale if self.spec.scale_gem else "multi-scale=mean")
