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
    head.pool.p                         -> head.pool.p   (GeM p; unused with GeM+/avg/max)
    head.fc (2048 -> 2048, bias)        -> fc

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

Strictness: every key under the prefix must map and every backbone/head key must be present
with the right shape (BatchNorm ``num_batches_tracked`` may be absent); otherwise
:class:`~sg_train.weights_io.WeightsMismatchError` names the keys and the stage blocks (a
ResNet-50 file read as depth 101 misses ``s3.b7`` ... ``s3.b23``).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

from torch import Tensor

from .backbone import load_backbone_weights
from .errors import OptionError
from .model import EmbeddingModel
from .pooling.gem import GeM
from .weights_io import WeightsMismatchError, describe_keys, natural_key, read_state_dict

__all__ = [
    "CVNET_MEAN_BGR",
    "CVNET_STD_BGR",
    "CVNET_PREFIXES",
    "STAGE_DEPTHS",
    "pycls_to_timm_key",
    "expected_pycls_keys",
    "cvnet_state_dict_to_embedding_model",
    "load_cvnet_weights",
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
    preprocessing come from the file and cannot be given. The model is returned in eval mode.
    """
    _check_depth(depth)
    fixed = {"backbone", "embedding_dim", "pretrained_weights", "input_format", "mean", "std"}
    clash = sorted(fixed & set(model_options))
    if clash:
        raise TypeError(f"CVNet weights fix {clash} themselves; do not pass them")

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
    if isinstance(model.head.pool, GeM):
        model.head.pool.p.data.copy_(own["head.pool.p"].reshape(1))
    else:
        log.info(
            "CVNet checkpoint: head.pool.p = %.4f not used by the %r pooling",
            float(own["head.pool.p"].reshape(-1)[0]),
            model.head.spec.pooling,
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
