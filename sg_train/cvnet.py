"""Load the CVNet checkpoints that SuperGlobal evaluates into an :class:`EmbeddingModel`.

The files are pycls ResNet-50/101 checkpoints (CVNet, Lee et al. CVPR 2022): the state
dict sits under ``model_state``, the global model's keys are prefixed ``encoder_q.`` (CVNet's
``CVNet_Rerank``; the other top-level modules, ``conv2ds.*`` and ``cv_learner.*``, are
CVNet's correlation re-ranker and are not part of the global descriptor) or
``globalmodel.``. Under the prefix, pycls names map onto timm's ResNet::

    stem.conv / stem.bn                 -> conv1 / bn1      (7x7/2 conv, BN, ReLU, 3x3/2 maxpool)
    s{i}.b{j}.f.a, .f.a_bn              -> layer{i}.{j-1}.conv1, .bn1   (1x1)
    s{i}.b{j}.f.b, .f.b_bn              -> layer{i}.{j-1}.conv2, .bn2   (3x3, carries the stride)
    s{i}.b{j}.f.c, .f.c_bn              -> layer{i}.{j-1}.conv3, .bn3   (1x1)
    s{i}.b{j}.proj, .bn                 -> layer{i}.{j-1}.downsample.0, .downsample.1
    head.pool.p                         -> head.pool.p   (GeM p; unused with GeM+/avg/max or a fixed-p GeM)
    head.fc (2048 -> 2048, bias)        -> fc

The writer goes the other way (:func:`timm_to_pycls_key`, :func:`embedding_model_to_cvnet_state_dict`,
:func:`write_cvnet_weights`): an sg-train ResNet-50/101 becomes a ``{"model_state": {"encoder_q.<pycls
key>": ...}}`` file that this module's loader and SuperGlobal's ``core/checkpoint.py``
``load_checkpoint`` read (the latter copies every key whose name and shape match its
``CVNet_Rerank`` and silently keeps its own initialisation for the rest, so the file carries every
key of the global model).

The architecture facts behind the map were checked in the published code (pycls
``model/resnet.py`` in CVNet and SuperGlobal): STRIDE_1X1 = False (stride on the 3x3 like
timm), BN eps 1e-5, a projection shortcut (1x1 conv + BN) on the first block of each stage,
and a stem with max-pool. The input is BGR, /255, normalised with CVNet's BGR-order
constants (``CVNET_MEAN_BGR``, ``CVNET_STD_BGR``); the returned model says so in its
``input_format``/``mean``/``std``.

Descriptors follow SuperGlobal's evaluation (an L2 between the pooling and the FC; CVNet's own
``extract_global_descriptor`` has none). ``relu_plus=True`` gives SuperGlobal's ReLU+ placement;
``relu_plus=False`` gives plain ReLUs, whereas SuperGlobal's code with its ``relup`` flag off
still floors stage-1 inner activations at 0.014 (its bottleneck is handed the ``relup`` class,
always truthy, instead of the flag).

CVNet's layout is the "l2_fc" neck (:class:`~sg_train.model.EmbeddingModel`: L2 -> FC): a model
with the "fc_bn" neck (CFCD's FC -> BatchNorm1d) is refused both ways, by the writer and the loader,
naming the option.

Strictness: every key under the prefix must map and every backbone/head key must be present
with the right shape (BatchNorm ``num_batches_tracked`` may be absent); otherwise
:class:`~sg_train.weights_io.WeightsMismatchError` names the keys and the stage blocks (a
ResNet-50 file read as depth 101 misses ``s3.b7`` ... ``s3.b23``).
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
from typing import Any, Mapping

import torch
from torch import Tensor

from .backbone import load_backbone_weights
from .errors import OptionError
from .files import atomic_write
from .model import EmbeddingModel
from .pooling.gem import GeM
from .weights_io import WeightsMismatchError, describe_keys, natural_key, read_state_dict

__all__ = [
    "CVNET_MEAN_BGR",
    "CVNET_STD_BGR",
    "CVNET_PREFIXES",
    "STAGE_DEPTHS",
    "pycls_to_timm_key",
    "timm_to_pycls_key",
    "expected_pycls_keys",
    "cvnet_state_dict_to_embedding_model",
    "load_cvnet_weights",
    "check_cvnet_convertible",
    "cvnet_depth",
    "cvnet_pool_p",
    "embedding_model_to_cvnet_state_dict",
    "write_cvnet_weights",
]

log = logging.getLogger(__name__)

CVNET_MEAN_BGR = (0.406, 0.456, 0.485)
CVNET_STD_BGR = (0.225, 0.224, 0.229)
#: prefixes of the global model inside a CVNet checkpoint, tried in this order
CVNET_PREFIXES = ("encoder_q.", "globalmodel.")
#: pycls ImageNet ResNet stage depths
STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
#: modules SuperGlobal's pycls ResNet builds but never uses for descriptors; ignored if present
_UNUSED_MODULES = ("seb1.", "seb2.", "sefc.")
_HEAD_KEYS = ("head.fc.weight", "head.fc.bias", "head.pool.p")
_FEATURES = 2048  # channels of a ResNet-50/101 last stage

_CONV = {"a": "conv1", "b": "conv2", "c": "conv3"}
_BN = {"a_bn": "bn1", "b_bn": "bn2", "c_bn": "bn3"}
_PYCLS_BLOCK = re.compile(r"^s(\d+)\.b(\d+)\.(.+)$")
#: per-colour statistics the two normalisations are compared with (decimal literals written in
#: different places)
_COLOUR_TOLERANCE = 1e-6
#: CVNet's GeM p before training (pycls ``GlobalHead(pp=3)``), written when the head has no p
_PYCLS_INIT_P = 3.0


def pycls_to_timm_key(key: str) -> str | None:
    """timm ResNet name of a pycls backbone key (``None`` if it is not a backbone key)."""
    if key.startswith("stem.conv."):
        return "conv1." + key[len("stem.conv."):]
    if key.startswith("stem.bn."):
        return "bn1." + key[len("stem.bn."):]
    m = _PYCLS_BLOCK.match(key)
    if not m:
        return None
    stage, block, rest = int(m[1]), int(m[2]), m[3]
    if block < 1:
        return None
    head, _, leaf = rest.rpartition(".")
    if head.startswith("f."):
        part = head[2:]
        name = _CONV.get(part) or _BN.get(part)
    else:
        name = {"proj": "downsample.0", "bn": "downsample.1"}.get(head)
    return f"layer{stage}.{block - 1}.{name}.{leaf}" if name else None


def timm_to_pycls_key(key: str) -> str | None:
    """pycls name of a timm ResNet-50/101 backbone key (``None`` if it is not one), e.g.
    ``layer3.5.conv2.weight`` -> ``s3.b6.f.b.weight``: :func:`pycls_to_timm_key` inverted over the
    keys of :func:`expected_pycls_keys`, so the map has one home."""
    return _timm_to_pycls().get(key)


@functools.cache
def _timm_to_pycls() -> dict[str, str]:
    return {pycls_to_timm_key(key): key for depth in STAGE_DEPTHS for key in expected_pycls_keys(depth)}


def _check_depth(depth: int) -> None:
    if depth not in STAGE_DEPTHS:
        raise OptionError(f"CVNet depth must be one of {sorted(STAGE_DEPTHS)}, got {depth!r}")


def expected_pycls_keys(depth: int) -> list[str]:
    """Backbone keys of a pycls ImageNet ResNet of this depth (BN ``num_batches_tracked`` included)."""
    _check_depth(depth)
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["stem.conv.weight", *(f"stem.bn.{b}" for b in bn)]
    for stage, blocks in enumerate(STAGE_DEPTHS[depth], start=1):
        for block in range(1, blocks + 1):
            pre = f"s{stage}.b{block}."
            if block == 1:  # projection shortcut: the first block changes width (and stride)
                keys += [pre + "proj.weight", *(pre + f"bn.{b}" for b in bn)]
            for part in ("a", "b", "c"):
                keys += [pre + f"f.{part}.weight", *(pre + f"f.{part}_bn.{b}" for b in bn)]
    return keys


def _select_prefix(state_dict: Mapping[str, Tensor]) -> str:
    for prefix in (*CVNET_PREFIXES, ""):
        if f"{prefix}stem.conv.weight" in state_dict:
            return prefix
    raise WeightsMismatchError(
        "not a CVNet checkpoint: no 'stem.conv.weight' under any of the prefixes "
        f"{list(CVNET_PREFIXES)} or at top level; the file has {describe_keys(state_dict)}"
    )


def _blocks(keys: list[str]) -> list[str]:
    found = {f"s{m[1]}.b{m[2]}" for k in keys if (m := _PYCLS_BLOCK.match(k))}
    return sorted(found, key=natural_key)


def _file_depth(keys: list[str]) -> int | None:
    per_stage = [0, 0, 0, 0]
    for k in keys:
        m = _PYCLS_BLOCK.match(k)
        if m and 1 <= int(m[1]) <= 4:
            per_stage[int(m[1]) - 1] = max(per_stage[int(m[1]) - 1], int(m[2]))
    return next((d for d, stages in STAGE_DEPTHS.items() if tuple(per_stage) == stages), None)


def cvnet_state_dict_to_embedding_model(
    state_dict: Mapping[str, Tensor], depth: int, **model_options: Any
) -> EmbeddingModel:
    """Build an :class:`EmbeddingModel` (timm ``resnet{depth}``, BGR input) from a CVNet state dict.

    ``state_dict`` is the checkpoint's ``model_state`` (keys prefixed ``encoder_q.`` or
    ``globalmodel.``, or bare pycls keys). ``model_options`` are EmbeddingModel keywords
    (``head``, ``relu_plus``, ``scales``, ``sgem``, ...); the backbone, embedding size and
    preprocessing come from the file and cannot be given. The file's GeM p is loaded into a
    learnable GeM; a fixed one (``gem_p_learnable=False``) keeps its ``gem_p``. ``neck="fc_bn"``
    raises :class:`~sg_train.weights_io.WeightsMismatchError` (the file has no BatchNorm1d). The
    model is returned in eval mode.
    """
    _check_depth(depth)
    fixed = {"backbone", "embedding_dim", "pretrained_weights", "input_format", "mean", "std"}
    clash = sorted(fixed & set(model_options))
    if clash:
        raise TypeError(f"CVNet weights fix {clash} themselves; do not pass them")
    neck = model_options.get("neck", "l2_fc")
    if neck != "l2_fc":
        raise WeightsMismatchError(
            f"CVNet weights hold the 'l2_fc' neck (L2 -> FC, no BatchNorm1d), so a model with neck={neck!r} "
            "(model.model_options.neck) cannot be built from them: set neck to 'l2_fc'"
        )

    prefix = _select_prefix(state_dict)
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    others = [k for k in state_dict if not k.startswith(prefix)]
    if others:
        log.info("CVNet checkpoint: ignoring %s outside the global model %r", describe_keys(others), prefix)
    ignored = [k for k in own if k.startswith(_UNUSED_MODULES)]
    if ignored:
        log.info("CVNet checkpoint: ignoring unused SuperGlobal modules, %s", describe_keys(ignored))
    own = {k: v for k, v in own.items() if not k.startswith(_UNUSED_MODULES)}

    missing_head = [prefix + k for k in _HEAD_KEYS if k not in own]
    if missing_head:
        raise WeightsMismatchError(f"CVNet checkpoint lacks the global head: missing {describe_keys(missing_head)}")
    fc_weight = own["head.fc.weight"]
    if fc_weight.ndim != 2 or own["head.fc.bias"].shape != fc_weight.shape[:1] or own["head.pool.p"].numel() != 1:
        raise WeightsMismatchError(
            f"CVNet head has unexpected shapes: head.fc.weight {tuple(fc_weight.shape)}, "
            f"head.fc.bias {tuple(own['head.fc.bias'].shape)}, head.pool.p {tuple(own['head.pool.p'].shape)}"
        )

    if fc_weight.shape[1] != _FEATURES:
        raise WeightsMismatchError(f"CVNet head.fc takes {fc_weight.shape[1]} features, a ResNet gives {_FEATURES}")

    expected = expected_pycls_keys(depth)
    body = {k: v for k, v in own.items() if k not in _HEAD_KEYS}
    missing = [k for k in expected if k not in body and not k.endswith("num_batches_tracked")]
    expected_set = set(expected)
    unexpected = [k for k in body if k not in expected_set]
    if missing or unexpected:
        problems = []
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                blocks = _blocks(keys)
                listed = describe_keys(prefix + k for k in keys)
                problems.append(f"{what} {listed}" + (f" (blocks {', '.join(blocks)})" if blocks else ""))
        file_depth = _file_depth(list(body))
        hint = f"; the file looks like a ResNet-{file_depth}" if file_depth and file_depth != depth else ""
        raise WeightsMismatchError(
            f"CVNet checkpoint does not fit a pycls ResNet-{depth}{hint} (nothing was loaded): " + "; ".join(problems)
        )

    model = EmbeddingModel(
        backbone=f"resnet{depth}",
        embedding_dim=int(fc_weight.shape[0]),
        input_format="bgr",
        mean=CVNET_MEAN_BGR,
        std=CVNET_STD_BGR,
        **model_options,
    )
    target = model.backbone.state_dict()
    mapped, wrong = {}, []
    for key, value in body.items():
        timm_key = pycls_to_timm_key(key)
        mapped[timm_key] = value
        if target[timm_key].shape != value.shape:
            wrong.append(f"{prefix}{key} (file {tuple(value.shape)}, model {tuple(target[timm_key].shape)})")
    if wrong:
        raise WeightsMismatchError(f"CVNet checkpoint has wrong shapes (nothing was loaded): {describe_keys(wrong)}")
    load_backbone_weights(model.backbone, mapped, name=f"resnet{depth}")  # strict, by construction complete
    model.fc.load_state_dict({"weight": fc_weight, "bias": own["head.fc.bias"]})
    if isinstance(model.head.pool, GeM) and model.head.pool.learnable:
        model.head.pool.p.data.copy_(own["head.pool.p"].reshape(1))
    else:
        log.info(
            "CVNet checkpoint: head.pool.p = %.4f not used by the %s pooling",
            float(own["head.pool.p"].reshape(-1)[0]),
            "fixed-p 'gem'" if isinstance(model.head.pool, GeM) else repr(model.head.spec.pooling),
        )
    return model.eval()


def load_cvnet_weights(
    path: str | os.PathLike, depth: int, *, trust_pickle: bool = False, **model_options: Any
) -> EmbeddingModel:
    """Read a CVNet checkpoint file (``model_state`` unwrapped) and convert it.

    ``model_options`` as in :func:`cvnet_state_dict_to_embedding_model`; e.g. the SuperGlobal
    setting is ``head="rgem+gemp+sgem", relu_plus=True, scales=(0.7071, 1.0, 1.4142)``.
    FileNotFoundError for a missing file, :class:`~sg_train.weights_io.WeightsFileError` for one
    that cannot be read (empty, truncated, another format: naming path and size);
    ``trust_pickle`` as in :func:`sg_train.weights_io.read_state_dict`.
    """
    state = read_state_dict(path, trust_pickle=trust_pickle, what="CVNet weights file")
    try:
        return cvnet_state_dict_to_embedding_model(state, depth, **model_options)
    except WeightsMismatchError as exc:
        raise WeightsMismatchError(f"{path}: {exc}") from exc


# ------------------------------------------------------------------------------------- writing
def cvnet_depth(backbone: str) -> int:
    """The pycls depth (50 or 101) of a timm backbone name that CVNet's layout can hold.

    ``resnet50`` / ``resnet101``, with or without a pretrained tag (``resnet50.a1_in1k``). Raises
    :class:`~sg_train.weights_io.WeightsMismatchError` naming the backbone for anything else (other
    depths, ResNet variants such as ``resnet50d``, other families).
    """
    depth = {f"resnet{d}": d for d in STAGE_DEPTHS}.get(str(backbone).split(".")[0])
    if depth is None:
        raise WeightsMismatchError(
            f"backbone {backbone!r} cannot be written as CVNet weights: CVNet's pycls layout holds only "
            f"{', '.join(f'resnet{d}' for d in sorted(STAGE_DEPTHS))}; export it as torchscript or onnx instead"
        )
    return depth


def cvnet_pool_p(model: EmbeddingModel) -> tuple[float, str]:
    """The ``head.pool.p`` to write for ``model`` and what it means.

    CVNet's head pools with GeM of a learnable p (``head.pool.p``), and both loaders need the key.
    ``gem``: the trained p (a fixed one, ``gem_p_learnable=False``: that p). ``gemp``: its fixed p (``gemp_p``; SuperGlobal's ``gemp`` switch uses
    4.6 itself). ``avg``: 1 (GeM with p = 1 is average pooling). ``max`` (and any pooling added with
    :func:`~sg_train.pooling.head.register_pooling`): no GeM p gives it; pycls's initial value 3 is
    written so that the file loads, and the note says the pooling is not reproduced by GeM.
    """
    pooling = model.head.spec.pooling
    if isinstance(model.head.pool, GeM):
        if not model.head.pool.learnable:
            p = model.head.pool.p_value()
            return p, f"GeM's fixed p = {p:g} (gem_p_learnable false); not a trained value"
        return model.head.pool.p_value(), "the trained GeM p"
    if pooling == "gemp":
        p = float(model.head.pool.p)
        return p, (f"GeM+'s fixed p = {p:g} (SuperGlobal's gemp switch uses 4.6; with it off, GeM with "
                   "this p); not a trained value")
    if pooling == "avg":
        return 1.0, "GeM with p = 1 is the average pooling the model was trained with; not a trained value"
    return _PYCLS_INIT_P, (f"pycls's initial p = {_PYCLS_INIT_P:g}, only so that the file loads: the model's "
                           f"{pooling!r} pooling has no GeM p, so CVNet/SuperGlobal code pools differently")


def _per_colour(input_format: str, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[float, ...]:
    """``(mean R, G, B, std R, G, B)`` of statistics given in ``input_format`` order."""
    if input_format == "bgr":
        mean, std = mean[::-1], std[::-1]
    return (*mean, *std)


def check_cvnet_convertible(model: EmbeddingModel) -> int:
    """The pycls depth of ``model`` if CVNet's layout can hold it exactly; raises otherwise.

    CVNet feeds BGR pixels / 255 normalised with :data:`CVNET_MEAN_BGR` / :data:`CVNET_STD_BGR`: a
    model that normalises every colour the same way (in either channel order) converts exactly.
    Raises :class:`~sg_train.weights_io.WeightsMismatchError` for a model with the "fc_bn" neck
    (CVNet's head is L2 -> FC, it has no BatchNorm1d), for a backbone other than timm's
    ResNet-50/101 (:func:`cvnet_depth`) and for a model whose per-colour mean/std differ from
    CVNet's (no channel permutation turns one normalisation into the other, and folding it into
    ``conv1`` is not exact at the zero-padded borders).
    """
    if model.neck != "l2_fc":
        raise WeightsMismatchError(
            f"the model cannot be written as CVNet weights: its neck is {model.neck!r} (model.model_options.neck; "
            "FC -> BatchNorm1d, CFCD's) and CVNet's layout holds only 'l2_fc' (L2 -> FC); export it as "
            "torchscript or onnx instead"
        )
    depth = cvnet_depth(model.backbone_name)
    want = _per_colour("bgr", CVNET_MEAN_BGR, CVNET_STD_BGR)
    got = _per_colour(model.input_format, tuple(model.mean), tuple(model.std))
    if not all(math.isclose(a, b, rel_tol=0, abs_tol=_COLOUR_TOLERANCE) for a, b in zip(want, got)):
        raise WeightsMismatchError(
            f"the model cannot be written as CVNet weights: it expects {model.input_format.upper()} pixels / 255 "
            f"normalised with mean {list(model.mean)}, std {list(model.std)} (per colour R, G, B: mean "
            f"{list(got[:3])}, std {list(got[3:])}), CVNet feeds BGR normalised with mean {list(CVNET_MEAN_BGR)}, "
            f"std {list(CVNET_STD_BGR)} (per colour: mean {list(want[:3])}, std {list(want[3:])}); only the "
            "channel order can be converted. Export it as torchscript or onnx instead"
        )
    return depth


def embedding_model_to_cvnet_state_dict(model: EmbeddingModel, *, prefix: str = "encoder_q.") -> dict[str, Tensor]:
    """The global model of ``model`` in CVNet's key layout: ``{prefix + pycls key: tensor}``.

    Holds every backbone key of :func:`expected_pycls_keys` (``num_batches_tracked`` included),
    ``head.fc.weight`` ``(embedding_dim, 2048)``, ``head.fc.bias`` and ``head.pool.p`` ``(1,)`` (see
    :func:`cvnet_pool_p`), as CPU copies. ``conv1``'s input channels are reversed for a model that
    takes RGB (CVNet's normalised BGR tensor is the normalised RGB tensor with its channels reversed).

    Raises :class:`~sg_train.weights_io.WeightsMismatchError` for a model CVNet's layout cannot hold
    (:func:`check_cvnet_convertible`) and for a backbone whose keys are not exactly a pycls ResNet's.
    """
    depth = check_cvnet_convertible(model)
    backbone = model.backbone.state_dict()
    names = {key: timm_to_pycls_key(key) for key in backbone}
    expected = set(expected_pycls_keys(depth))
    unexpected = [key for key, name in names.items() if name not in expected]
    missing = sorted(expected - set(names.values()), key=natural_key)
    if unexpected or missing:
        problems = ([f"no pycls ResNet-{depth} name for {describe_keys(unexpected)}"] if unexpected else []) + (
            [f"missing {describe_keys(missing)}"] if missing else [])
        raise WeightsMismatchError(
            f"backbone {model.backbone_name!r} is not a plain pycls ResNet-{depth}: {'; '.join(problems)}"
        )
    state = {f"{prefix}{names[key]}": value.detach().cpu().clone() for key, value in backbone.items()}
    if model.input_format == "rgb":
        conv = f"{prefix}stem.conv.weight"
        state[conv] = state[conv].flip(1).contiguous()
    state[f"{prefix}head.fc.weight"] = model.fc.weight.detach().cpu().clone()
    state[f"{prefix}head.fc.bias"] = model.fc.bias.detach().cpu().clone()
    state[f"{prefix}head.pool.p"] = torch.tensor([cvnet_pool_p(model)[0]], dtype=torch.float32)
    return state


def write_cvnet_weights(model: EmbeddingModel, path: str | os.PathLike) -> None:
    """Write ``{"model_state": embedding_model_to_cvnet_state_dict(model)}`` to ``path`` (``torch.save``,
    atomically: a reader sees the old file or the new one).

    Read it back with :func:`load_cvnet_weights` (``depth`` from :func:`cvnet_depth`, the model's
    head and options as keywords) or SuperGlobal's ``load_checkpoint`` (``MODEL.DEPTH``,
    ``MODEL.HEADS.REDUCTION_DIM`` = the embedding size, or its loader silently keeps a random FC).
    Raises as :func:`embedding_model_to_cvnet_state_dict`, before anything is written.
    """
    checkpoint = {"model_state": embedding_model_to_cvnet_state_dict(model)}
    atomic_write(path, lambda fh: torch.save(checkpoint, fh))
