"""Pooling heads: GeM, GeM+, Regional-GeM, Scale-GeM, and the head-spec parser."""
from .gem import GeM, GeMPlus, gem
from .head import HeadSpec, PoolingHead, available_poolings, parse_head_spec, register_pooling
from .regional_gem import RegionalGeM, regional_gem
from .scale_gem import scale_gem_finite, scale_gem_max, scale_mean

__all__ = [
    "GeM",
    "GeMPlus",
    "gem",
    "RegionalGeM",
    "regional_gem",
    "scale_gem_max",
    "scale_gem_finite",
    "scale_mean",
    "HeadSpec",
    "PoolingHead",
    "parse_head_spec",
    "register_pooling",
    "available_poolings",
]
