"""Where weights files and sg-train checkpoints are read, and what "does not fit" means.

Reading (every failure names the path and what the file should hold):

- ``load_torch_file(path, ...)``: ``torch.load`` onto the CPU; a file that cannot be read (empty,
  cut short, an HTML page or a Git LFS pointer instead of the weights) raises
  :class:`WeightsFileError` naming its size and the fix.
- ``read_state_dict(path)``: a plain weights file (.safetensors or anything ``torch.load`` reads),
  unwrapped from ``state_dict`` / ``model`` / ``model_state`` and from a DDP ``module.`` prefix.
- ``read_lightning_checkpoint(path)``: a checkpoint written by ``train.py``.

Fitting: ``state_dict_mismatches`` lists missing, unexpected and wrongly shaped keys and
``check_exact_fit`` raises them. Every "does not fit" failure (weights, a checkpoint, its stored
model configuration) is a :class:`WeightsMismatchError`, raised before a single tensor is copied
(never a half-load).

An sg-train checkpoint (a Lightning checkpoint) holds the module's weights under ``state_dict``
(the embedding model under ``model.``, the margin loss under ``loss_fn.``) and, under
``"sg_train"``, the record that describes it (:func:`write_checkpoint_record`): the model's full,
versioned configuration (:attr:`sg_train.model.EmbeddingModel.config`), the label map (the
original landmark id of each class) and the name of the retrieval protocol it was validated
with. Checkpoints written before the record existed have none; their readers fall back to the
hyper-parameters and say so.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UserInputError

__all__ = [
    "CHECKPOINT_RECORD_KEY",
    "LOSS_PREFIX",
    "MODEL_PREFIX",
    "WeightsFileError",
    "WeightsMismatchError",
    "as_lightning_checkpoint",
    "check_exact_fit",
    "describe_keys",
    "load_torch_file",
    "natural_key",
    "read_lightning_checkpoint",
    "read_state_dict",
    "split_state_dict",
    "state_dict_mismatches",
    "stored_class_names",
    "stored_landmark_ids",
    "stored_model_config",
    "write_checkpoint_record",
]

#: containers a weights file may nest its state dict under, tried in this order
NESTED_STATE_KEYS = ("state_dict", "model", "model_state")
#: where the LightningModule keeps the embedding model and the margin loss in ``state_dict``
MODEL_PREFIX = "model."
LOSS_PREFIX = "loss_fn."
#: the key of the record that describes an sg-train checkpoint
CHECKPOINT_RECORD_KEY = "sg_train"
CHECKPOINT_CONTENT = "a Lightning checkpoint (.ckpt) written by train.py"


class WeightsMismatchError(UserInputError):
    """Weights (a file, a checkpoint or its stored configuration) that do not fit the model."""


class WeightsFileError(WeightsMismatchError):
    """A weights or checkpoint file that cannot be read at all: empty, cut short or another format."""


# -------------------------------------------------------------------------------- reading files
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


def read_lightning_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint onto the CPU and check that it holds a ``state_dict``.

    Lightning checkpoints pickle their hyper-parameters, so ``weights_only=False`` is needed: load
    only checkpoints you trust. Raises FileNotFoundError for a missing file and
    :class:`WeightsFileError` (a ValueError) naming the path for a file that is empty, truncated
    or not a Lightning checkpoint (its size, or the keys it holds).
    """
    path = Path(path)
    return as_lightning_checkpoint(load_torch_file(path, what="checkpoint", expected=CHECKPOINT_CONTENT,
                                                   weights_only=False), path)


def as_lightning_checkpoint(checkpoint: object, path: str | Path) -> dict[str, Any]:
    """``checkpoint`` (loaded from ``path``) when it is a Lightning checkpoint, else
    :class:`WeightsFileError` naming the keys it holds."""
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = sorted(map(str, checkpoint))[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise WeightsFileError(
            f"{path} is not a Lightning checkpoint: no 'state_dict' key (found: {keys}); it should be "
            f"{CHECKPOINT_CONTENT} (a plain weights file goes to pretrained_weights instead)"
        )
    return checkpoint


def split_state_dict(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


# ------------------------------------------------------------------ the sg-train checkpoint record
def write_checkpoint_record(
    checkpoint: dict[str, Any],
    *,
    model_config: Mapping[str, Any],
    landmark_ids: Iterable[int] | None,
    protocol: str | None,
    class_names: Iterable[str] | None = None,
) -> None:
    """Store the record that describes an sg-train checkpoint under ``checkpoint["sg_train"]``.

    ``model_config``: :attr:`EmbeddingModel.config <sg_train.model.EmbeddingModel.config>` (plain
    values, with its own format name and version); ``landmark_ids``: the original landmark id of
    each class, in class order (None when the data has none); ``class_names``: the name of each
    class, in class order (None when the data has none); ``protocol``: the name of the retrieval
    protocol the run is validated with (None without one).
    """
    checkpoint[CHECKPOINT_RECORD_KEY] = {
        "model": dict(model_config),
        "landmark_ids": None if landmark_ids is None else [int(i) for i in landmark_ids],
        "class_names": None if class_names is None else [str(n) for n in class_names],
        "protocol": protocol,
    }


def _record(checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
    record = checkpoint.get(CHECKPOINT_RECORD_KEY)
    if record is not None and not isinstance(record, Mapping):
        raise WeightsFileError(
            f"the checkpoint's {CHECKPOINT_RECORD_KEY!r} entry is a {type(record).__name__}, not the record "
            f"sg-train writes; it should be {CHECKPOINT_CONTENT}"
        )
    return record


def stored_model_config(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The model configuration an sg-train checkpoint stores; None for a checkpoint written before
    sg-train stored one. Raises :class:`WeightsFileError` for a record that is not a mapping.
    Rebuild the model with :meth:`EmbeddingModel.from_config <sg_train.model.EmbeddingModel.from_config>`."""
    record = _record(checkpoint)
    config = record.get("model") if record is not None else None
    return None if config is None else dict(config)


def stored_landmark_ids(checkpoint: Mapping[str, Any]) -> list[int] | None:
    """The original landmark id of each class (the label map) an sg-train checkpoint stores.

    Checkpoints written before the record existed: the first entry that holds ``landmark_ids``
    (the datamodule's own state). None when neither has one.
    """
    record = _record(checkpoint)
    if record is not None and record.get("landmark_ids") is not None:
        return [int(i) for i in record["landmark_ids"]]
    for value in checkpoint.values():
        if isinstance(value, Mapping) and value.get("landmark_ids") is not None:
            return [int(i) for i in value["landmark_ids"]]
    return None


def stored_class_names(checkpoint: Mapping[str, Any]) -> list[str] | None:
    """The class names (in class order) an sg-train checkpoint stores; None when it has none
    (GLDv2 runs, and checkpoints written before sg-train stored them)."""
    record = _record(checkpoint)
    names = record.get("class_names") if record is not None else None
    return None if names is None else [str(n) for n in names]


# ---------------------------------------------------------------------------------- fitting
def natural_key(text: str) -> list[object]:
    """Sort key that orders ``s3.b7`` before ``s3.b10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def describe_keys(keys: Iterable[str], limit: int = 10) -> str:
    """``"3 keys: a, b, c"`` / ``"25 keys: k1, ..., k10, ... (+15 more)"`` (natural order)."""
    keys = sorted(keys, key=natural_key)
    shown = ", ".join(keys[:limit])
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''}: {shown}{more}"


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


def check_exact_fit(target: nn.Module, source: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`WeightsMismatchError` naming every missing, unexpected or wrongly shaped key of
    ``source`` for ``target`` (``what`` names the source, e.g. "checkpoint runs/a/last.ckpt")."""
    problems = state_dict_mismatches(target.state_dict(), source)
    if problems:
        raise WeightsMismatchError(
            f"{what} does not fit the configured model (nothing was loaded); " + "; ".join(problems)
        )
