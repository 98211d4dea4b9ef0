"""Evaluation protocols: every preprocessing rule of a published Revisited Oxford/Paris evaluation.

A protocol fixes how the pixels a model sees are made from the benchmark's files, so that a number
measured here means what the paper it is compared with means:

- **query crop**: the float ``bbx = [x1, y1, x2, y2]`` of the ground truth (x2/y2 exclusive) turned
  into pixels by ``bbx_rounding``: ``"round"`` (Python's ``round``, half to even) or ``"trunc"``
  (Python's ``int()``, towards zero);
- **size cap**: ``max_size``, the longest side after shrinking (INTER_AREA, aspect kept, never
  enlarged; see ``datamodules.revisited.fit_longest_side``), or None for the files as they are;
- **scales** and how each is made: an NCHW batch of normalised images is resized to
  ``(int(h·s), int(w·s))`` (at least 1 pixel; s = 1 is not resized) with ``interpolation``
  (``F.interpolate``, ``align_corners=False``) and ``antialias``;
- **colours**: ``input_format`` ("rgb"/"bgr"), ``mean``, ``std`` (in that order, of pixels / 255) as
  the published code feeds its model, or None where the published code leaves them to the model.

Every image is decoded to 8-bit RGB (``sg_train.image_io``, OpenCV's decoder, EXIF orientation
applied) and divided by 255 under every protocol; the model receives them in its own channel order.

The two published evaluations (read in the repositories at the commits named; docs/design.md §8
lists every detail with its line):

``revisitop``
    The benchmark's reference code, filipradenovic/revisitop@be39832 ``python/example_process_images.py``:
    queries ``pil_loader(...).crop(bbx)`` (Pillow's ``Image._crop`` does ``int(round(v))``), every
    image at full resolution, colours and extraction left to the method. For the extraction the
    protocol uses sg-train's own multi-scale setting, which is what the training callback has always
    measured: scales exactly ``(1/√2, 1, √2)``, bilinear **with** antialias (no aliasing when
    shrinking), colours the model's own.
``superglobal``
    SuperGlobal's published test code, ShihaoShao-GH/SuperGlobal@6db11a7 (unchanged at 8694696):
    ``test/dataset.py`` reads with ``cv2.imread`` (BGR), crops queries
    ``im[int(bbx[1]):int(bbx[3]), int(bbx[0]):int(bbx[2])]``, feeds full-resolution images
    (``scale_list_fix = [1.0]`` from ``test/test_model.py``; batch size 1) as ``im / 255`` normalised
    with ``_MEAN = [0.406, 0.456, 0.485]``, ``_SD = [0.225, 0.224, 0.229]`` (BGR order);
    ``model/resnet.py`` ``ResNet.forward`` makes the scales ``[0.7071, 1., 1.4142]``
    (``TEST.SCALE_LIST = 3`` in ``config.py``) with
    ``torchvision.transforms.functional.resize(x_, [int(h*scl), int(w*scl)])`` on the normalised
    tensor: bilinear, and **no** antialias, because torchvision before 0.17 (January 2024; the code
    and its results date from August 2023) took the unset ``antialias`` as False for tensors.
    The colours are CVNet's, so the protocol fixes them: a model is accepted when it normalises every
    colour the same way (CVNet's BGR weights exactly; an RGB model with ImageNet's statistics in RGB
    order gets the same per-colour normalisation in its own order) and refused otherwise.

A protocol with some settings changed (``--scales``, ``--max-size``) is named ``"custom"`` and
remembers the protocol it came from in ``base``; it is recorded as such, never under the name of a
published protocol.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .cvnet import CVNET_MEAN_BGR, CVNET_STD_BGR
from .errors import OptionError
from .model import check_scales, resize_for_scale

__all__ = [
    "BBX_ROUNDINGS",
    "CUSTOM",
    "EVAL_PROTOCOLS",
    "INTERPOLATIONS",
    "REVISITOP",
    "SUPERGLOBAL",
    "EvalProtocol",
    "ProtocolError",
    "get_protocol",
    "resolve_protocol",
]

BBX_ROUNDINGS = ("round", "trunc")
INTERPOLATIONS = ("bilinear", "bicubic")
CUSTOM = "custom"
_COLOUR_TOLERANCE = 1e-6  # statistics written as decimal literals in different places


class ProtocolError(OptionError):
    """An unknown protocol, settings that do not describe one, or a model whose colours contradict it."""


@dataclass(frozen=True)
class EvalProtocol:
    """Every preprocessing rule of one evaluation (see the module docstring for each field's meaning).

    Attributes:
        name: the registry name ("revisitop", "superglobal") or "custom".
        bbx_rounding: "round" or "trunc", see :meth:`crop_box`.
        scales: extraction scales, each > 0, in order.
        antialias: antialias when resizing to a scale.
        max_size: longest side after shrinking, or None (full resolution).
        input_format, mean, std: the colours the published code feeds its model, or all None.
        interpolation: "bilinear" or "bicubic" (``F.interpolate`` mode of the per-scale resize).
        base: the protocol a "custom" one was derived from (None for the published ones).
        source: where the rules were read (repository@commit and files).

    Raises :class:`ProtocolError` for a value outside these ranges, naming it.
    """

    name: str
    bbx_rounding: str
    scales: tuple[float, ...]
    antialias: bool
    max_size: int | None
    input_format: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"
    base: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.bbx_rounding not in BBX_ROUNDINGS:
            raise ProtocolError(f"bbx_rounding must be one of {BBX_ROUNDINGS}, got {self.bbx_rounding!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ProtocolError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        try:
            scales = check_scales(self.scales)
        except OptionError as exc:
            raise ProtocolError(str(exc)) from None
        object.__setattr__(self, "scales", scales)
        if self.max_size is not None:
            if isinstance(self.max_size, bool) or int(self.max_size) != self.max_size or int(self.max_size) < 1:
                raise ProtocolError(f"max_size must be a positive number of pixels or None, got {self.max_size!r}")
            object.__setattr__(self, "max_size", int(self.max_size))
        colours = (self.input_format, self.mean, self.std)
        if any(v is None for v in colours) and not all(v is None for v in colours):
            raise ProtocolError(f"input_format, mean and std are fixed together or not at all, got {colours}")
        if self.input_format is not None:
            if self.input_format not in ("rgb", "bgr"):
                raise ProtocolError(f"input_format must be 'rgb' or 'bgr', got {self.input_format!r}")
            object.__setattr__(self, "mean", _three("mean", self.mean))
            object.__setattr__(self, "std", _three("std", self.std))

    # -- geometry ---------------------------------------------------------------------------
    def crop_box(self, bbx: Sequence[float]) -> tuple[int, int, int, int]:
        """Integer crop ``(x1, y1, x2, y2)`` (x2, y2 exclusive) of a float box ``[x1, y1, x2, y2]``.

        "round": ``int(round(v))`` per coordinate (Pillow's ``Image.crop``, Python's half-to-even
        round); "trunc": ``int(v)`` (SuperGlobal's slice). E.g. ``[10.6, 8.6, 90.6, 72.6]`` gives
        ``(11, 9, 91, 73)`` and ``(10, 8, 90, 72)``. Whether the box fits its image is the caller's check.
        """
        if len(bbx) != 4:
            raise ProtocolError(f"a box is [x1, y1, x2, y2], got {list(bbx)}")
        if self.bbx_rounding == "round":
            return tuple(round(float(v)) for v in bbx)  # type: ignore[return-value]
        return tuple(int(float(v)) for v in bbx)  # type: ignore[return-value]

    def resize(self, images: Tensor, scale: float) -> Tensor:
        """An NCHW float batch resized to :func:`sg_train.model.scaled_size` of scale ``scale`` (both
        published codes use ``int()``), with this protocol's interpolation and antialias; s = 1: unchanged."""
        if scale <= 0:
            raise ProtocolError(f"scales must be > 0, got {scale}")
        return resize_for_scale(images, scale, mode=self.interpolation, antialias=self.antialias)

    # -- colours ----------------------------------------------------------------------------
    def check_colours(self, input_format: str, mean: Sequence[float], std: Sequence[float], *, what: str) -> None:
        """Refuse a model whose per-colour normalisation differs from the one this protocol fixes.

        Colours are compared per colour (R, G, B), not per channel position: the channel order is
        the model's own. No-op for a protocol that leaves colours to the model. Raises
        :class:`ProtocolError` naming both normalisations; ``what`` names the model in the message.
        """
        if self.input_format is None:
            return
        want = _per_colour(self.input_format, self.mean, self.std)
        got = _per_colour(str(input_format).lower(), mean, std)
        if all(math.isclose(a, b, rel_tol=0, abs_tol=_COLOUR_TOLERANCE) for a, b in zip(want, got)):
            return
        raise ProtocolError(
            f"protocol {self.name!r} feeds {self.input_format.upper()} pixels / 255 normalised with mean "
            f"{list(self.mean)}, std {list(self.std)} (per colour R, G, B: mean {list(want[:3])}, std "
            f"{list(want[3:])}; {self.source}), but {what} expects {str(input_format).upper()} with mean "
            f"{list(mean)}, std {list(std)} (per colour R, G, B: mean {list(got[:3])}, std {list(got[3:])}); "
            f"evaluate it under a protocol that leaves colours to the model, e.g. 'revisitop'")

    # -- derived protocols and records ------------------------------------------------------
    def customised(self, **changes: Any) -> EvalProtocol:
        """This protocol with ``changes`` (field=value) applied: itself if nothing differs, otherwise a
        protocol named "custom" whose ``base`` is this one's name (or its base). Raises
        :class:`ProtocolError` for an unknown field or a value out of range."""
        allowed = {f.name for f in dataclasses.fields(self)} - {"name", "base", "source"}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise ProtocolError(f"cannot change {unknown} of a protocol; settings are {sorted(allowed)}")
        changed = dataclasses.replace(self, **changes)
        if changed == self:
            return self
        return dataclasses.replace(changed, name=CUSTOM, base=self.base or self.name,
                                   source=f"{self.base or self.name} with {sorted(changes)} changed")

    def describe(self) -> dict[str, Any]:
        """Every field as plain JSON (lists for tuples), for results files and cache keys."""
        out = dataclasses.asdict(self)
        for key in ("scales", "mean", "std"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    def summary(self) -> str:
        """One line, e.g. ``superglobal: crop int(), scales 0.7071/1/1.4142 bilinear without antialias, ...``."""
        name = self.name if self.base is None else f"{self.name} (from {self.base})"
        crop = "int(round())" if self.bbx_rounding == "round" else "int()"
        scales = "/".join(f"{s:g}" for s in self.scales)
        size = "full size" if self.max_size is None else f"longest side <= {self.max_size}"
        colours = ("the model's colours" if self.input_format is None else
                   f"{self.input_format.upper()} mean {list(self.mean)} std {list(self.std)}")
        return (f"{name}: crop {crop}, scales {scales} {self.interpolation} "
                f"{'with' if self.antialias else 'without'} antialias, {size}, {colours}")


def _three(what: str, values: Sequence[float] | None) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)  # type: ignore[union-attr]
    if len(out) != 3:
        raise ProtocolError(f"{what} needs 3 values (one per colour), got {list(out)}")
    return out


def _per_colour(input_format: str, mean: Sequence[float], std: Sequence[float]) -> tuple[float, ...]:
    """``(mean R, mean G, mean B, std R, std G, std B)`` of statistics given in ``input_format`` order."""
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if input_format == "bgr":
        mean, std = mean[::-1], std[::-1]
    return (*mean, *std)


REVISITOP = EvalProtocol(
    name="revisitop",
    bbx_rounding="round",
    scales=(1 / math.sqrt(2), 1.0, math.sqrt(2)),
    antialias=True,
    max_size=None,
    source="filipradenovic/revisitop@be39832 python/example_process_images.py (PIL crop, full resolution); "
           "scales and resize are sg-train's",
)

SUPERGLOBAL = EvalProtocol(
    name="superglobal",
    bbx_rounding="trunc",
    scales=(0.7071, 1.0, 1.4142),
    antialias=False,
    max_size=None,
    input_format="bgr",
    mean=CVNET_MEAN_BGR,  # test/dataset.py _MEAN
    std=CVNET_STD_BGR,  # test/dataset.py _SD
    source="ShihaoShao-GH/SuperGlobal@6db11a7 test/dataset.py, test/test_model.py, model/resnet.py",
)

#: the published protocols by name
EVAL_PROTOCOLS: dict[str, EvalProtocol] = {p.name: p for p in (REVISITOP, SUPERGLOBAL)}


def get_protocol(protocol: str | EvalProtocol) -> EvalProtocol:
    """The protocol registered as ``protocol`` (a protocol object is returned as it is).

    Raises :class:`ProtocolError` for an unknown name, listing the valid ones.
    """
    if isinstance(protocol, EvalProtocol):
        return protocol
    found = EVAL_PROTOCOLS.get(str(protocol).lower())
    if found is None:
        hint = (" ('custom' is what a named protocol becomes when its settings are changed, e.g. with "
                "--scales or --max-size)" if str(protocol).lower() == CUSTOM else "")
        raise ProtocolError(f"unknown evaluation protocol {protocol!r}; valid: {sorted(EVAL_PROTOCOLS)}{hint}")
    return found


def resolve_protocol(
    protocol: str | EvalProtocol, *, scales: Sequence[float] | None = None, max_size: int | None = None
) -> EvalProtocol:
    """:func:`get_protocol` with the settings given (not None) applied by :meth:`EvalProtocol.customised`:
    the protocol itself when they equal its own, else its "custom" variant."""
    changes: dict[str, Any] = {}
    if scales is not None:
        changes["scales"] = tuple(scales)
    if max_size is not None:
        changes["max_size"] = max_size
    return get_protocol(protocol).customised(**changes)
