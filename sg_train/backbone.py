"""timm backbones: creation by name (never from the network) and strict local-weights loading.

``create_backbone(name)`` builds ``timm.create_model(name, pretrained=False, num_classes=0,
global_pool="")`` and checks that its ``forward_features`` returns an NCHW map (pooling heads
need one; ViTs return token sequences and are refused with an error naming the model).

``read_state_dict(path)`` / ``load_torch_file(path, ...)`` read a weights or checkpoint file; a
file that cannot be read (empty, cut short, an HTML page or a Git LFS pointer instead of the
weights) raises :class:`WeightsFileError` naming the path, its size and what it should hold.

``load_backbone_weights(model, path)`` loads a local weights file and checks it strictly:
the only keys allowed to be absent from the model are the classifier's (timm's
``pretrained_cfg["classifier"]``, e.g. ``fc.*`` of a ResNet, which ``num_classes=0`` removes);
the only keys allowed to be absent from the file are BatchNorm ``num_batches_tracked``
counters (older torchvision files have none; they do not change the outputs). Anything else
missing, unexpected or of the wrong shape raises :class:`WeightsMismatchError` listing the
keys, before a single tensor is copied.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "WeightsFileError",
    "WeightsMismatchError",
    "create_backbone",
    "load_torch_file",
    "read_state_dict",
    "load_backbone_weights",
    "classifier_prefixes",
    "describe_keys",
    "state_dict_mismatches",
    "natural_key",
]

#: containers a checkpoint may nest its state dict under, tried in this order
NESTED_STATE_KEYS = ("state_dict", "model", "model_state")


class WeightsMismatchError(ValueError):
    """A weights file whose keys or shapes do not fit the model."""


class WeightsFileError(WeightsMismatchError):
    """A weights or checkpoint file that cannot be read at all: empty, cut short or another format."""


def _looks_like(head: bytes) -> str:
    """What the first bytes of a file that should hold weights suggest instead ("" when nothing)."""
    if head.startswith(b"version https://git-lfs"):
        return ", but it is a Git LFS pointer: run `git lfs pull` in the repository it came from"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html", b"<?xml")):
        return ", but it is an HTML/XML page (a failed or login-walled download?): download it again"
    return ""


def _unreadable(
    path: Path, what: str, expected: str, exc: BaseException | None = None, hint: str = ""
) -> WeightsFileError:
    """The :class:`WeightsFileError` for ``path``: its size, what it should be, why and the fix.

    ``what`` names the role ("checkpoint", "weights file"), ``expected`` the content it should
    have; ``exc`` is the reader's own error (None for an empty file); ``hint`` is added unless
    the first bytes show the file is something else entirely (an LFS pointer, a web page).
    """
    size = path.stat().st_size
    if size == 0:
        return WeightsFileError(
            f"{what} {path} is empty (0 bytes); it should be {expected}. The file was cut short "
            "(a full disk or an interrupted copy or download): copy or download it again"
        )
    with open(path, "rb") as fh:
        other = _looks_like(fh.read(64))
    first = " ".join(str(exc).split()).split(". ")[0][:200] if exc is not None else ""
    cause = f" ({type(exc).__name__}: {first})" if exc is not None else ""
    return WeightsFileError(
        f"cannot read {what} {path} ({size:,} bytes){cause}; it should be {expected}"
        + (other or f". If it is cut short or damaged, copy or download it again{hint}")
    )


def load_torch_file(path: str | os.PathLike, *, what: str, expected: str, weights_only: bool = True) -> object:
    """``torch.load(path)`` onto the CPU, with an error that names the file when it cannot be read.

    Raises FileNotFoundError for a missing file and :class:`WeightsFileError` (a ValueError)
    naming ``what``, the path, its size in bytes and ``expected`` for an empty, truncated or
    foreign file. With ``weights_only`` (no code runs) a file holding other objects is refused
    too, with a hint: pass ``weights_only=False`` only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise _unreadable(path, what, expected)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - re-raised naming the file, its size and what it should be
        hint = (
            "; it may also hold objects other than tensors: if the file is from a source you trust, "
            "trust_pickle=True lets it unpickle them"
            if weights_only and "weights_only" in str(exc) else ""
        )
        raise _unreadable(path, what, expected, exc, hint) from exc


def natural_key(text: str) -> list[object]:
    """Sort key that orders ``s3.b7`` before ``s3.b10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def describe_keys(keys: Iterable[str], limit: int = 10) -> str:
    """``"3 keys: a, b, c"`` / ``"25 keys: k1, ..., k10, ... (+15 more)"`` (natural order)."""
    keys = sorted(keys, key=natural_key)
    shown = ", ".join(keys[:limit])
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''}: {shown}{more}"


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

    Unknown name: ValueError listing close matches. Non-NCHW output (ViT tokens, NHWC maps):
    ValueError naming the model. Weights are random (``pretrained=False``); see
    :func:`load_backbone_weights`.
    """
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        close = _suggest(str(name))
        hint = f"close matches: {', '.join(close)}" if close else "see timm.list_models()"
        raise ValueError(f"unknown timm backbone {name!r}; {hint}")
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
                raise ValueError(
                    f"backbone {name!r}: forward_features failed on a {size[0]}x{size[1]} probe image: {exc}"
                ) from exc
    channels = getattr(model, "num_features", None)
    if not isinstance(out, Tensor) or out.ndim != 4 or (channels is not None and out.shape[1] != channels):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"backbone {name!r}: forward_features returns {shape}, not an NCHW feature map with "
            f"{channels} channels; the pooling heads need a convolutional backbone (e.g. resnet50, "
            "convnext_tiny, efficientnet_b0), not a token sequence (ViT) or an NHWC map"
        )


def read_state_dict(
    path: str | os.PathLike, *, trust_pickle: bool = False, what: str = "weights file"
) -> dict[str, Tensor]:
    """Read a weights file (.safetensors, or anything ``torch.load`` reads: .pth/.pt/.bin/.ckpt).

    A state dict nested under ``state_dict`` / ``model`` / ``model_state`` is unwrapped; a
    ``module.`` prefix carried by every key (DataParallel/DDP) is stripped. Loaded on the CPU
    with ``weights_only=True`` (no code runs) unless ``trust_pickle`` is set, which lets a
    file you trust unpickle arbitrary objects (e.g. an old checkpoint holding numpy scalars).
    ``what`` names the file's role in errors. Raises FileNotFoundError, :class:`WeightsFileError`
    for a file that cannot be read (empty, truncated, another format; naming path and size) and
    :class:`WeightsMismatchError` for one that holds no state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    expected = "a state dict of tensors saved with torch.save (.pth/.pt/.bin/.ckpt) or a .safetensors file"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - re-raised naming the file, its size and what it should be
            raise _unreadable(path, what, "a .safetensors file", exc) from exc
    else:
        obj = load_torch_file(path, what=what, expected=expected, weights_only=not trust_pickle)
    for key in NESTED_STATE_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        kind = f"keys {describe_keys(map(str, obj))}" if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsMismatchError(f"{path} does not hold a state dict of tensors (found {kind})")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The classifier module name(s) from timm's ``pretrained_cfg["classifier"]``."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    cls = cfg.get("classifier")
    if cls is None:
        return ()
    return (cls,) if isinstance(cls, str) else tuple(cls)


def state_dict_mismatches(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor], *, droppable: Callable[[str], bool] = lambda key: False
) -> list[str]:
    """Why ``given`` does not fit a model whose state dict is ``expected`` (empty when it fits).

    Lists keys missing from ``given`` (BatchNorm ``num_batches_tracked`` may be), keys the model
    does not have (unless ``droppable``) and wrong shapes.
    """
    unexpected = sorted(k for k in given if k not in expected and not droppable(k))
    missing = sorted(k for k in expected if k not in given and not k.endswith("num_batches_tracked"))
    wrong_shape = sorted(
        f"{k} (file {tuple(given[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    )
    problems = []
    if missing:
        problems.append(f"missing from the file: {describe_keys(missing)}")
    if unexpected:
        problems.append(f"not in the model: {describe_keys(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shape: {describe_keys(wrong_shape)}")
    return problems


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
    if leftover or result.unexpected_keys:  # cannot happen after the checks above; never pass silently
        raise WeightsMismatchError(f"weights {source}: load_state_dict reported {result}")
    return {"dropped_classifier_keys": dropped}
