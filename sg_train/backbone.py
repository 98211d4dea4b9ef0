"""timm backbones: creation by name (never from the network) and strict local-weights loading.

``create_backbone(name)`` builds ``timm.create_model(name, pretrained=False, num_classes=0,
global_pool="")`` and checks that its ``forward_features`` returns an NCHW map (pooling heads
need one; ViTs return token sequences and are refused with an error naming the model).

``load_backbone_weights(model, path)`` reads a local weights file
(:func:`sg_train.weights_io.read_state_dict`) and checks it strictly: the only keys allowed to be
absent from the model are the classifier's (timm's ``pretrained_cfg["classifier"]``, e.g. ``fc.*``
of a ResNet, which ``num_classes=0`` removes); the only keys allowed to be absent from the file are
BatchNorm ``num_batches_tracked`` counters (older torchvision files have none; they do not change
the outputs). Anything else missing, unexpected or of the wrong shape raises
:class:`~sg_train.weights_io.WeightsMismatchError` listing the keys, before a single tensor is copied.
"""
from __future__ import annotations

import difflib
import os
from typing import Mapping

import torch
from torch import Tensor, nn

from .errors import OptionError
from .weights_io import WeightsMismatchError, read_state_dict, state_dict_mismatches

__all__ = ["create_backbone", "load_backbone_weights", "classifier_prefixes"]


def _suggest(name: str) -> list[str]:
    import timm

    base = name.split(".")[0]
    found = timm.list_models(f"*{base}*")[:10]
    for close in difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6):
        if close not in found:
            found.append(close)
    return found


def create_backbone(name: str) -> nn.Module:
    """A timm model without classifier or global pool whose ``forward_features`` gives NCHW.

    Unknown name: :class:`~sg_train.errors.OptionError` listing close matches. Non-NCHW output
    (ViT tokens, NHWC maps) or a ``forward_features`` that fails on a blank image: OptionError
    naming the model. Weights are random (``pretrained=False``); see
    :func:`load_backbone_weights`.
    """
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        close = _suggest(str(name))
        hint = f"close matches: {', '.join(close)}" if close else "see timm.list_models()"
        raise OptionError(f"unknown timm backbone {name!r}; {hint}")
    model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    _check_nchw(model, name)
    return model


def _probe(model: nn.Module, in_chans: int, size: tuple[int, int]) -> object:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.forward_features(torch.zeros(1, in_chans, *size))
    finally:
        model.train(was_training)


def _check_nchw(model: nn.Module, name: str) -> None:
    """Run ``forward_features`` on one blank image (32 px, or the model's fixed input size)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    in_chans, h, w = cfg.get("input_size", (3, 224, 224))
    sizes = [(h, w)] if cfg.get("fixed_input_size", False) else [(32, 32), (h, w)]
    for i, size in enumerate(sizes):
        try:
            out = _probe(model, in_chans, size)
            break
        except Exception as exc:  # noqa: BLE001 - retried at the full size, then re-raised with the model named
            if i == len(sizes) - 1:
                raise OptionError(
                    f"backbone {name!r}: forward_features failed on a {size[0]}x{size[1]} probe image: {exc}"
                ) from exc
    channels = getattr(model, "num_features", None)
    if not isinstance(out, Tensor) or out.ndim != 4 or (channels is not None and out.shape[1] != channels):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise OptionError(
            f"backbone {name!r}: forward_features returns {shape}, not an NCHW feature map with "
            f"{channels} channels; the pooling heads need a convolutional backbone (e.g. resnet50, "
            "convnext_tiny, efficientnet_b0), not a token sequence (ViT) or an NHWC map"
        )


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The classifier module name(s) from timm's ``pretrained_cfg["classifier"]``."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    cls = cfg.get("classifier")
    if cls is None:
        return ()
    return (cls,) if isinstance(cls, str) else tuple(cls)


def load_backbone_weights(
    model: nn.Module,
    weights: str | os.PathLike | Mapping[str, Tensor],
    *,
    name: str | None = None,
) -> dict[str, list[str]]:
    """Strictly load a timm backbone state dict (a file path or a mapping) into ``model``.

    Returns ``{"dropped_classifier_keys": [...]}``. Raises :class:`WeightsMismatchError`
    (missing / unexpected / wrong-shape keys, each listed) or FileNotFoundError.
    """
    source = str(weights) if not isinstance(weights, Mapping) else "the given state dict"
    state = read_state_dict(weights) if not isinstance(weights, Mapping) else dict(weights)
    label = name or (getattr(model, "pretrained_cfg", {}) or {}).get("architecture") or type(model).__name__
    expected = model.state_dict()

    cls = classifier_prefixes(model)
    is_classifier = lambda k: any(k == c or k.startswith(c + ".") for c in cls)  # noqa: E731
    dropped = sorted(k for k in state if k not in expected and is_classifier(k))
    problems = state_dict_mismatches(expected, state, droppable=is_classifier)
    if problems:
        raise WeightsMismatchError(
            f"weights {source} do not fit backbone {label!r} (nothing was loaded): " + "; ".join(problems)
        )
    kept = {k: v for k, v in state.items() if k in expected}
    result = model.load_state_dict(kept, strict=False)
    leftover = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if leftover or result.unexpected_keys:  # a bug if it happens (the checks above passed): never pass silently
        raise RuntimeError(f"weights {source}: load_state_dict reported {result} after the fit checks passed")
    return {"dropped_classifier_keys": dropped}
