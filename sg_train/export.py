"""Export the descriptor extractor of a trained model: TorchScript, ONNX, CVNet weights.

``python -m sg_train.export --checkpoint run/checkpoints/last.ckpt --out exported/`` writes, next to
each other:

- ``descriptor.torchscript.pt`` and ``descriptor.onnx``: one graph each, input ``images``, a float32
  ``(B, 3, H, W)`` batch already normalised as the model expects (``(pixels / 255 - mean) / std`` in
  ``input_format`` channel order), output ``descriptors``, float32 ``(B, D)``, L2-normalised: what
  :meth:`EmbeddingModel.extract <sg_train.model.EmbeddingModel.extract>` returns, i.e. per scale
  ``s`` the batch resized to ``(int(H·s), int(W·s))`` (bilinear, antialias; s = 1 not resized),
  embedded, the scales aggregated by the head (Scale-GeM max / finite, or mean) and normalised.
  B, H and W are dynamic.
- ``cvnet.pyth``: the global model in CVNet's pycls layout (:func:`sg_train.cvnet.write_cvnet_weights`),
  for ResNet-50/101 models with the "l2_fc" neck whose colours CVNet's BGR normalisation can express
  (a model with CFCD's "fc_bn" neck goes to TorchScript and ONNX only, its BatchNorm1d on its running
  statistics, as in eval mode).
- ``export.json``: the preprocessing (``input_format``, ``scale`` = 1/255, ``mean``, ``std``,
  ``scales``, ``embedding_dim``), the model configuration, and per file what it holds and how
  closely it was found to match the eager model. The ONNX file carries the preprocessing in its
  ``metadata_props`` too (JSON values), the TorchScript file as the extra file ``preprocessing.json``.

How each graph keeps B, H and W dynamic:

- **The resize**: both graphs resize with ``_resize_traceable``, the model's rule
  (:func:`~sg_train.model.resize_for_scale`: ``max(1, int(side·s))``, bilinear, antialias) with the
  sizes written as ``math.floor`` of the input size, which ``torch.jit.script`` compiles and
  ``torch.export`` keeps symbolic (``int()`` of a size is frozen to a constant by ``torch.jit.trace``
  and by ``torch.export``).
- **ONNX**: ``torch.export`` with ``Dim.DYNAMIC`` batch, height and width (it refuses a graph that
  freezes any of them), then ``torch.onnx.export`` at opset >= 18, where ``Resize`` has ``antialias``
  (the exporter maps the antialiased bilinear resize onto it). onnxruntime's antialiased ``Resize``
  differs from torch's when a side shrinks to 1 px from more (e.g. 3 x 2 -> 2 x 1, an image of 2 or 3 px
  at scale 0.7071); at every other size tried the two agree to 1e-7.
- **TorchScript**: ``torch.jit.trace`` of the extraction with the size-dependent steps scripted
  (``torch.jit.script`` keeps their arithmetic and branches): the resize and Regional-GeM's choice of
  padding.
- **Regional-GeM** pads the feature map by reflection when every side exceeds (k-1)/2 and by
  replication otherwise (:func:`~sg_train.pooling.regional_gem.regional_gem`), a Python branch on the
  map size that tracing freezes. The export records the module twice, on a map large enough for
  reflection and on a 1 x 1 map, and the graph chooses between the two by the same rule
  (``torch.cond`` in ONNX, an ``if`` in TorchScript). The graphs are traced on images large enough for
  every feature map to take reflection (:func:`example_size`): the exporter cannot record the
  reflection branch on a map too small for it.
- TorchScript is frozen (``torch.jit.freeze``: weights become constants, BatchNorm folded into the
  convolutions), the usual form for inference: its first call at each new input size is optimised
  in a fraction of the unfrozen module's time.

Every file is read back (TorchScript with ``torch.jit.load``, ONNX with onnxruntime's
CPUExecutionProvider, CVNet weights with :func:`sg_train.cvnet.cvnet_state_dict_to_embedding_model`)
and compared with the eager model at two image sizes before anything is written; a larger max abs
difference than :data:`PARITY_TOLERANCE` refuses the export. Scales that would make the traced and
checked images (sized for the smallest scale, :func:`example_size`) longer than
:data:`MAX_CHECK_SIDE` px on a side, as they are or at the largest scale, are refused.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx

from .cvnet import (
    CVNET_MEAN_BGR,
    CVNET_STD_BGR,
    check_cvnet_convertible,
    cvnet_pool_p,
    cvnet_state_dict_to_embedding_model,
    embedding_model_to_cvnet_state_dict,
    write_cvnet_weights,
)
from .eval_protocols import get_protocol
from .errors import OptionError, UserInputError, one_line, user_error_line
from .files import atomic_write, why_not_a_folder, write_json
from .inference import model_from_checkpoint
from .model import CONFIG_KEYS, EmbeddingModel, check_scales
from .pooling.regional_gem import RegionalGeM
from .weights_io import WeightsMismatchError

__all__ = [
    "EXPORT_FORMATS",
    "EXPORT_RECORD_FORMAT",
    "EXPORT_RECORD_VERSION",
    "FILE_NAMES",
    "MAX_CHECK_SIDE",
    "MIN_ONNX_OPSET",
    "PARITY_TOLERANCE",
    "SIDECAR_NAME",
    "ExportError",
    "build_parser",
    "example_size",
    "export_model",
    "main",
    "onnx_bytes",
    "torchscript_module",
    "unsupported_formats",
]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("torchscript", "onnx", "cvnet")
FILE_NAMES = {"torchscript": "descriptor.torchscript.pt", "onnx": "descriptor.onnx", "cvnet": "cvnet.pyth"}
SIDECAR_NAME = "export.json"
EXPORT_RECORD_FORMAT = "sg-train/export"
EXPORT_RECORD_VERSION = 1
#: ONNX ``Resize`` has ``antialias`` since opset 18; below it the antialiased resize has no equivalent
MIN_ONNX_OPSET = 18
#: max abs difference of an exported file's descriptors from the eager model's (unit-norm vectors)
PARITY_TOLERANCE = 1e-4
#: longest side (px) of an image the tracing and the parity check may run the model on: the traced
#: input (sized for the smallest scale, :func:`example_size`) and its copy at the largest scale
MAX_CHECK_SIDE = 2048
#: the graphs' input and output names
INPUT_NAME, OUTPUT_NAME = "images", "descriptors"
_DEFAULT_STRIDE = 32  # a backbone's total stride when timm's feature_info does not say
_EXAMPLE_BATCH = 2  # a batch of 1 would be specialised as a constant by torch.export


class ExportError(UserInputError):
    """An export that cannot be done as asked: an output file that exists (without ``overwrite``), a
    format the model cannot be written in, or a file whose descriptors differ from the model's."""


# ----------------------------------------------------------------------------- the graphs
def example_size(model: EmbeddingModel) -> tuple[int, int]:
    """``(H, W)`` of the images the graphs are traced on.

    At the smallest of ``model.scales`` the image is ``(r·(k+2), r·(k+3))`` px, ``r`` the backbone's
    total stride (timm's ``feature_info``, 32 for a ResNet) and ``k`` Regional-GeM's padding
    ((kernel-1)/2, 0 without R-GeM): every feature map then has sides of at least k+2 cells, large
    enough for R-GeM's reflection padding, which is recorded at this size (module docstring).
    E.g. 182 x 227 for a ResNet with R-GeM (5 x 5) at scales 0.7071, 1, 1.4142; 91 x 136 without.
    """
    info = getattr(model.backbone, "feature_info", None)
    stride = int(info[-1]["reduction"]) if info else _DEFAULT_STRIDE
    pad = (model.head.regional.kernel_size - 1) // 2 if model.head.regional is not None else 0
    smallest = min(model.scales)
    return math.ceil(stride * (pad + 2) / smallest), math.ceil(stride * (pad + 3) / smallest)


def _second_size(size: tuple[int, int]) -> tuple[int, int]:
    """The second size the files are checked at: another aspect ratio, three quarters of the sides."""
    height, width = size
    return max(1, width * 3 // 4), max(1, height * 3 // 4)


class _RegionalGeMBySize(nn.Module):
    """Regional-GeM with its padding rule as a graph branch: reflection when every side of the map
    exceeds (k-1)/2, replication otherwise (the rule of
    :func:`~sg_train.pooling.regional_gem.regional_gem`).

    ``record(module, example)`` records the original module on an example map: once on a map just
    large enough for reflection, once on a 1 x 1 map. Scripted, the module takes the branch with an
    ``if``; under ``torch.export`` with ``torch.cond``.
    """

    def __init__(self, regional: RegionalGeM, channels: int, record: Callable[[nn.Module, Tensor], nn.Module]) -> None:
        super().__init__()
        self.pad = (regional.kernel_size - 1) // 2
        with torch.no_grad():
            self.reflect = record(regional, torch.rand(1, channels, self.pad + 1, self.pad + 1))
            self.replicate = record(regional, torch.rand(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            if min(x.shape[-2], x.shape[-1]) > self.pad:
                return self.reflect(x)
            return self.replicate(x)
        return self._cond(x)

    @torch.jit.unused
    def _cond(self, x: Tensor) -> Tensor:
        large = torch.sym_min(x.shape[-2], x.shape[-1]) > self.pad
        return torch.cond(large, self.reflect, self.replicate, (x,))


def _resize_traceable(images: Tensor, scale: float) -> Tensor:
    """:func:`~sg_train.model.resize_for_scale` with the model's settings (bilinear, antialias), its
    sizes written so that both exporters keep them as arithmetic on the input size.

    ``max(1, floor(side·s))`` is :func:`~sg_train.model.scaled_size`'s ``max(1, int(side·s))`` (floor
    and ``int()`` agree on positive numbers); ``torch.jit.script`` compiles it, and ``torch.export``
    keeps ``math.floor`` of a symbolic size symbolic, where ``int()`` would make it a constant.
    s = 1: unchanged.
    """
    if scale == 1.0:
        return images
    height = max(1, math.floor(images.shape[-2] * scale))
    width = max(1, math.floor(images.shape[-1] * scale))
    return F.interpolate(images, size=[height, width], mode="bilinear", align_corners=False, antialias=True)


class _DescriptorExtractor(nn.Module):
    """``images (B, 3, H, W) -> model.extract(images, resize=resize)``: the graph's one input and output."""

    def __init__(self, model: EmbeddingModel, resize: Callable[[Tensor, float], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.resize = resize

    def forward(self, images: Tensor) -> Tensor:
        return self.model.extract(images, resize=self.resize)


def _exportable(model: EmbeddingModel, record: Callable[[nn.Module, Tensor], nn.Module]) -> EmbeddingModel:
    """A copy of ``model`` in eval mode whose Regional-GeM, if any, is a :class:`_RegionalGeMBySize`."""
    out = copy.deepcopy(model).eval()
    if out.head.regional is not None:
        out.head.regional = _RegionalGeMBySize(out.head.regional, out.feature_dim, record)
    return out


def _example(size: tuple[int, int]) -> Tensor:
    return torch.randn(_EXAMPLE_BATCH, 3, *size, generator=torch.Generator().manual_seed(0))


def torchscript_module(model: EmbeddingModel, *, size: tuple[int, int] | None = None) -> torch.jit.ScriptModule:
    """``model.extract`` (the model's scales) as TorchScript: float32 ``(B, 3, H, W) -> (B, D)``, any B, H, W.

    ``torch.jit.trace`` on a ``(2, 3, *size)`` batch (default :func:`example_size`) with the resize
    and Regional-GeM's padding rule scripted (see the module docstring), then ``torch.jit.freeze``.
    The backbone is traced: one whose ``forward_features`` computes on the input size in Python would
    be frozen at ``size`` (:func:`export_model` checks a second size and refuses such a file).
    """
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about each Python-level size check it freezes (the pooling functions' input
        # checks, Regional-GeM's padding rule in each recorded branch); what matters is checked
        # instead: the result at two sizes (export_model).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        exportable = _exportable(model, torch.jit.trace)
        if exportable.head.regional is not None:
            exportable.head.regional = torch.jit.script(exportable.head.regional)
        extractor = _DescriptorExtractor(exportable, torch.jit.script(_resize_traceable)).eval()
        return torch.jit.freeze(torch.jit.trace(extractor, _example(size or example_size(model)), check_trace=False))


def _check_opset(opset: int) -> None:
    """OptionError for an opset below :data:`MIN_ONNX_OPSET` or above the installed onnx's newest."""
    import onnx.defs

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_ONNX_OPSET:
        raise OptionError(
            f"ONNX opset {opset!r} cannot hold the antialiased bilinear resize of multi-scale extraction: ONNX Resize "
            f"has 'antialias' since opset {MIN_ONNX_OPSET}; use --opset {MIN_ONNX_OPSET} or higher"
        )
    if opset > newest:
        raise OptionError(f"ONNX opset {opset} is newer than the installed onnx {onnx.__version__} knows ({newest}); "
                          f"use --opset {MIN_ONNX_OPSET} to {newest}")


def onnx_bytes(
    model: EmbeddingModel,
    *,
    opset: int = MIN_ONNX_OPSET,
    size: tuple[int, int] | None = None,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """``model.extract`` (the model's scales) as a serialised ONNX model: input ``images``, float32
    ``(B, 3, H, W)``, output ``descriptors``, float32 ``(B, D)``; B, H, W dynamic.

    ``torch.export`` on a ``(2, 3, *size)`` batch (default :func:`example_size`), converted
    by ``torch.onnx.export`` at ``opset`` (>= :data:`MIN_ONNX_OPSET`; an opset the exporter cannot
    write raises :class:`~sg_train.errors.OptionError`); ``metadata`` goes to the model's
    ``metadata_props``.
    """
    _check_opset(opset)
    exportable = _exportable(model, lambda module, example: make_fx(module)(example))
    extractor = _DescriptorExtractor(exportable, _resize_traceable).eval()
    dynamic = torch.export.Dim.DYNAMIC
    with torch.no_grad():
        program = torch.export.export(
            extractor, (_example(size or example_size(model)),),
            dynamic_shapes={INPUT_NAME: {0: dynamic, 2: dynamic, 3: dynamic}},
        )
        onnx_program = torch.onnx.export(
            program, dynamo=True, opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            verbose=False,
        )
    written = onnx_program.model.opset_imports.get("")
    if written != opset:  # torch's exporter warns and keeps its own opset when it cannot convert
        raise OptionError(f"torch {torch.__version__} cannot write ONNX opset {opset} (it wrote opset {written}); "
                          f"use --opset {MIN_ONNX_OPSET} or another opset it converts to")
    onnx_program.model.metadata_props.update(metadata or {})
    return onnx_program.model_proto.SerializeToString()


# ----------------------------------------------------------------------------- checking the files
def _max_differences(
    model: EmbeddingModel, run: Callable[[Tensor], Tensor | np.ndarray], sizes: Sequence[tuple[int, int]], what: str
) -> dict[str, float]:
    """``{"BxHxW": max |run(images) - model.extract(images)|}`` for random batches, of 2 images at the
    first size and 1 at the others; :class:`ExportError` naming ``what`` above :data:`PARITY_TOLERANCE`."""
    generator = torch.Generator().manual_seed(1)
    found = {}
    for i, size in enumerate(sizes):
        images = torch.randn(1 if i else 2, 3, *size, generator=generator)
        with torch.no_grad():
            expected = model.extract(images)
            got = torch.as_tensor(run(images))
        if got.shape != expected.shape:
            raise ExportError(f"{what} gives descriptors of shape {tuple(got.shape)} for a {tuple(images.shape)} "
                              f"batch, the model {tuple(expected.shape)}; nothing was written")
        found["x".join(map(str, images.shape[:1] + images.shape[2:]))] = float((got - expected).abs().max())
    if not max(found.values()) <= PARITY_TOLERANCE:
        raise ExportError(
            f"{what} does not reproduce the model: max abs difference of the descriptors per image size {found} "
            f"(tolerance {PARITY_TOLERANCE}); nothing was written (a difference at the second size alone means that "
            "the graph froze a size-dependent step of the backbone at the first)"
        )
    return found


def _onnx_runner(data: bytes) -> Callable[[Tensor], np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return lambda images: session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]


@dataclass
class _Output:
    """One checked file: ``write(path)`` writes it atomically; ``record`` is what the sidecar says of it."""

    write: Callable[[Path], None]
    record: dict[str, Any]


def _bytes_writer(data: bytes) -> Callable[[Path], None]:
    return lambda path: atomic_write(path, lambda fh: fh.write(data))


def _torchscript_output(model: EmbeddingModel, sizes: list[tuple[int, int]], preprocessing: dict[str, Any]) -> _Output:
    buffer = io.BytesIO()
    extra = {"preprocessing.json": json.dumps(preprocessing)}
    torch.jit.save(torchscript_module(model, size=sizes[0]), buffer, _extra_files=extra)
    data = buffer.getvalue()
    checked = _max_differences(model, torch.jit.load(io.BytesIO(data)), sizes, "the TorchScript export")
    return _Output(_bytes_writer(data), {"max_abs_difference": checked, "extra_files": sorted(extra)})


def _onnx_output(model: EmbeddingModel, sizes: list[tuple[int, int]], opset: int,
                 preprocessing: dict[str, Any]) -> _Output:
    metadata = {key: json.dumps(value) for key, value in preprocessing.items()}
    data = onnx_bytes(model, opset=opset, size=sizes[0], metadata=metadata)
    checked = _max_differences(model, _onnx_runner(data), sizes, "the ONNX export (onnxruntime, CPUExecutionProvider)")
    return _Output(_bytes_writer(data), {"opset": opset, "max_abs_difference": checked,
                                         "metadata_props": sorted(metadata)})


def _cvnet_output(model: EmbeddingModel, sizes: list[tuple[int, int]]) -> _Output:
    depth = check_cvnet_convertible(model)
    fixed = {"backbone", "embedding_dim", "input_format", "mean", "std"}  # the file's own
    options = {key: value for key, value in model.config.items() if key in CONFIG_KEYS and key not in fixed}
    reloaded = cvnet_state_dict_to_embedding_model(embedding_model_to_cvnet_state_dict(model), depth, **options)
    to_bgr = (lambda images: images.flip(1)) if model.input_format == "rgb" else (lambda images: images)
    checked = _max_differences(model, lambda images: reloaded.extract(to_bgr(images)), sizes,
                               "the CVNet weights (read back with sg_train.cvnet)")
    spec = model.head.spec
    p, meaning = cvnet_pool_p(model)
    if spec.pooling not in ("gem", "gemp", "avg"):
        log.warning("CVNet weights: head.pool.p = %g is %s", p, meaning)
    return _Output(lambda path: write_cvnet_weights(model, path), {
        "depth": depth,
        "input_format": "bgr",
        "mean": list(CVNET_MEAN_BGR),
        "std": list(CVNET_STD_BGR),
        "conv1_input_channels": "reversed (the model takes RGB)" if model.input_format == "rgb" else "as trained",
        "head_pool_p": p,
        "head_pool_p_meaning": meaning,
        "load_cvnet_weights": {"depth": depth, **options},
        "superglobal": {"MODEL.DEPTH": depth, "MODEL.HEADS.REDUCTION_DIM": model.embedding_dim,
                        "SupG.gemp": spec.pooling == "gemp", "SupG.rgem": spec.regional,
                        "SupG.sgem": spec.scale_gem, "SupG.relup": model.relu_plus},
        "max_abs_difference": checked,
    })


# ----------------------------------------------------------------------------- the export
def unsupported_formats(model: EmbeddingModel) -> dict[str, str]:
    """``{format: why}`` for the formats of :data:`EXPORT_FORMATS` that ``model`` cannot be written in:
    ``cvnet`` unless the model is a timm ResNet-50/101 with the "l2_fc" neck whose colours CVNet's BGR
    normalisation expresses (:func:`sg_train.cvnet.check_cvnet_convertible`). TorchScript and ONNX take
    every model."""
    try:
        check_cvnet_convertible(model)
    except WeightsMismatchError as exc:
        return {"cvnet": one_line(exc)}
    return {}


def _check_size_affordable(scales: Sequence[float], size: tuple[int, int], chosen: bool) -> None:
    """OptionError when the images traced and checked at ``size`` (:func:`example_size` unless
    ``chosen``) would reach more than :data:`MAX_CHECK_SIDE` px a side, as is or at the largest scale."""
    largest = max(1.0, *scales)
    side = math.floor(max(size) * largest)
    if side > MAX_CHECK_SIDE:
        why, fix = (("the size asked for", "trace at a smaller size") if chosen else
                    (f"example_size: large enough for every feature map at the smallest scale, {min(scales):g}",
                     "raise the smallest scale or lower the largest (e.g. --scales 0.7071 1 1.4142)"))
        raise OptionError(f"extraction scales {list(scales)} (--scales): the export would trace and check the model "
                          f"on {size[0]} x {size[1]} px images ({why}), {side} px a side "
                          f"{'as is' if largest == 1.0 else f'at scale {largest:g}'}, beyond the {MAX_CHECK_SIDE} px "
                          f"the parity check allows; {fix}")


def _plan(out: Path, formats: Sequence[str], overwrite: bool) -> dict[str, Path]:
    """The path of each format's file and of the sidecar (under ``"export.json"``), after checking the
    format names, that ``out`` is or can be made a folder (not a file, nor inside one) and that
    nothing would be overwritten without ``overwrite``."""
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise OptionError(f"unsupported export format(s) {unknown or list(formats)}; "
                          f"the formats are {', '.join(EXPORT_FORMATS)}")
    why = why_not_a_folder(out)
    if why is not None:
        raise ExportError(f"--out {out} {why}; choose a folder for the exported files (created if missing)")
    paths = {fmt: out / FILE_NAMES[fmt] for fmt in dict.fromkeys(formats)}
    paths[SIDECAR_NAME] = out / SIDECAR_NAME
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not overwrite:
        raise ExportError(f"{', '.join(existing)} already exist(s); pass --overwrite (overwrite=True) to replace "
                          f"them, or choose another --out")
    return paths


def export_model(
    model: EmbeddingModel,
    out: str | Path,
    formats: Sequence[str] | None = None,
    *,
    opset: int = MIN_ONNX_OPSET,
    overwrite: bool = False,
    size: tuple[int, int] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Write ``model``'s descriptor extractor to the folder ``out`` in ``formats``, plus ``export.json``;
    return what ``export.json`` holds.

    ``formats``: names from :data:`EXPORT_FORMATS`; default every one the model can be written in
    (those :func:`unsupported_formats` does not name; the sidecar lists the others under
    ``"not_written"``). The graphs extract at ``model.scales`` (build the model with the scales
    wanted: :func:`~sg_train.inference.model_from_checkpoint` ``scales=``). ``opset``: the ONNX opset
    (>= 18). ``size``: ``(H, W)`` the graphs are traced on (default :func:`example_size`); every file
    is read back and compared with the eager model at ``size`` and at a second size of another aspect
    ratio. ``source``: what the sidecar names as the model's origin (the checkpoint path).

    Everything is built and checked before the first file is written; each file is written
    atomically, the sidecar last; ``model`` is put in eval mode. Raises
    :class:`~sg_train.errors.OptionError` for an unknown format, an opset the exporter cannot write
    (below 18: no antialiased Resize), scales outside [:data:`~sg_train.model.MIN_SCALE`,
    :data:`~sg_train.model.MAX_SCALE`] or naming one twice (:func:`~sg_train.model.check_scales`),
    and scales (or a ``size``) that would make the traced and checked images longer than
    :data:`MAX_CHECK_SIDE` px on a side at the largest scale (the input included); :class:`ExportError`
    for an ``out`` that is a file or inside one, an existing output file without ``overwrite``
    (naming it) and for a file whose descriptors differ from the model's by more than
    :data:`PARITY_TOLERANCE`; :class:`~sg_train.weights_io.WeightsMismatchError` when ``cvnet`` is
    asked for a model CVNet's layout cannot hold (naming the backbone or the normalisation).
    """
    out = Path(out)
    skipped = unsupported_formats(model) if formats is None else {}
    formats = [f for f in EXPORT_FORMATS if f not in skipped] if formats is None else list(formats)
    paths = _plan(out, formats, overwrite)
    if "onnx" in paths:
        _check_opset(opset)
    if "cvnet" in paths:
        check_cvnet_convertible(model)
    check_scales(model.scales, "the model's scales")
    chosen = size is not None
    size = size or example_size(model)
    _check_size_affordable(model.scales, size, chosen)
    model = model.eval()
    sizes = [size, _second_size(size)]
    preprocessing = {**model.preprocessing, "mean": list(model.mean), "std": list(model.std),
                     "scales": list(model.scales), "embedding_dim": model.embedding_dim}

    outputs: dict[str, _Output] = {}
    if "torchscript" in paths:
        outputs["torchscript"] = _torchscript_output(model, sizes, preprocessing)
    if "onnx" in paths:
        outputs["onnx"] = _onnx_output(model, sizes, opset, preprocessing)
    if "cvnet" in paths:
        outputs["cvnet"] = _cvnet_output(model, sizes)

    out.mkdir(parents=True, exist_ok=True)
    for fmt, output in outputs.items():
        output.write(paths[fmt])
    record = {
        "format": EXPORT_RECORD_FORMAT,
        "version": EXPORT_RECORD_VERSION,
        "source": source,
        "preprocessing": preprocessing,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 3, "height", "width"],
                  "normalised": "(pixels * scale - mean) / std, channels in input_format order"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", model.embedding_dim],
                   "l2_normalised": True},
        "traced_at": list(size),
        "parity_tolerance": PARITY_TOLERANCE,
        "files": {fmt: {"file": paths[fmt].name, **output.record} for fmt, output in outputs.items()},
        "not_written": skipped,
        "model": model.config,
    }
    write_json(paths[SIDECAR_NAME], record)
    return record


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sg_train.export",
        description="Export the descriptor extractor of an sg-train checkpoint as TorchScript, ONNX and/or CVNet "
                    "weights, with its preprocessing in export.json. Every file is compared with the model before "
                    "it is written.")
    parser.add_argument("--checkpoint", required=True, help="sg-train Lightning checkpoint (.ckpt) written by train.py")
    parser.add_argument("--out", required=True, help="folder for the exported files (created if missing)")
    parser.add_argument("--formats", nargs="+", metavar="FORMAT",
                        help=f"any of {', '.join(EXPORT_FORMATS)} (default: every one the model can be written in; "
                             "cvnet needs a resnet50/resnet101 with the l2_fc neck and ImageNet colour statistics)")
    parser.add_argument("--scales", nargs="+", type=float, metavar="S",
                        help="extraction scales baked into the graphs, each from 1/16 to 4 and given once "
                             "(default: the revisitop evaluation protocol's, 1/sqrt(2) 1 sqrt(2), as retrieval "
                             "evaluation and sg_train.load_model extract). The graphs are traced and checked on "
                             "images of 64 x 96 px divided by the smallest scale for a ResNet (128 x 160 with R-GeM "
                             "5 x 5), so that every feature map has enough cells at that scale; scales for which such "
                             f"an image exceeds {MAX_CHECK_SIDE} px a side, as is or at the largest scale, are "
                             "refused: for a ResNet, max(1, largest scale) may be at most about 21 times the smallest "
                             "(12.8 with R-GeM)")
    parser.add_argument("--opset", type=int, default=MIN_ONNX_OPSET,
                        help=f"ONNX opset, at least {MIN_ONNX_OPSET} (antialiased Resize) (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace exported files already in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        scales = args.scales or get_protocol("revisitop").scales
        check_scales(scales, "--scales")  # before the checkpoint is read
        model = model_from_checkpoint(args.checkpoint, scales=scales)
        record = export_model(model, args.out, args.formats, opset=args.opset, overwrite=args.overwrite,
                              source=str(args.checkpoint))
    except Exception as exc:
        line = user_error_line(exc)  # re-raises a bug with its traceback
        print(f"python -m sg_train.export: error: {line}", file=sys.stderr)
        return 1
    out = Path(args.out)
    for fmt, entry in record["files"].items():
        checked = ", ".join(f"{size} {diff:.1e}" for size, diff in entry["max_abs_difference"].items())
        print(f"wrote {out / entry['file']} ({fmt}; max abs difference from the model at {checked})")
    for fmt, why in record["not_written"].items():
        print(f"not written: {fmt}: {why}")
    print(f"wrote {out / SIDECAR_NAME} (preprocessing {json.dumps(record['preprocessing'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
