"""Revisited Oxford/Paris ground truth: safe loading, validation, and the E/M/H protocols.

``gnd_<name>.pkl`` is a dict with ``imlist`` and ``qimlist`` (image names) and ``gnd``: one dict
per query with ``bbx`` ([x1, y1, x2, y2]) and ``easy``, ``hard``, ``junk`` (indices into imlist).
Pickles can run arbitrary code when loaded, so the file is read through a restricted unpickler
that admits only plain containers, numbers, strings and numpy arrays/dtypes/scalars.
"""
from __future__ import annotations

import io
import math
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserInputError

__all__ = ["GroundTruthError", "UnsafePickleError", "load_gnd", "validate_gnd", "query_gnd",
           "index_array", "dataset_name", "PROTOCOLS", "CATEGORIES", "GndEntries"]

# protocol -> (categories counted as positives, categories counted as junk)
PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "E": (("easy",), ("junk", "hard")),
    "M": (("easy", "hard"), ("junk",)),
    "H": (("hard",), ("junk", "easy")),
}
CATEGORIES = ("easy", "hard", "junk")


class GroundTruthError(UserInputError):
    """A ground-truth file or structure that does not follow the Revisited format."""


class UnsafePickleError(UserInputError, pickle.UnpicklingError):
    """A pickle that asks for an object outside the allow-list (its payload is never run)."""


# numpy moved numpy.core to numpy._core in 2.0; pickles from either era name one or the other.
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}
# Plain containers/values that older protocols spell as globals (protocol 2 writes bytes as
# _codecs.encode(str, "latin1"), sets as builtins.set([...])).
_BUILTIN_GLOBALS = {
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytes"), ("builtins", "bytearray"),
    ("__builtin__", "set"), ("__builtin__", "frozenset"), ("__builtin__", "bytes"),
    ("__builtin__", "bytearray"), ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            if module.startswith("numpy.core.") and hasattr(np, "_core"):
                module = "numpy._core." + module[len("numpy.core."):]
            return super().find_class(module, name)
        if (module, name) in _BUILTIN_GLOBALS:
            return super().find_class(module, name)
        if module.startswith("numpy.dtypes") and name.endswith("DType"):  # numpy's dtype classes
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to load global '{module}.{name}': ground-truth pickles may hold only plain "
            "containers, numbers, strings and numpy arrays")


def dataset_name(path: str | os.PathLike) -> str:
    """``.../gnd_roxford5k.pkl`` -> ``roxford5k`` (other names: the file stem)."""
    stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    return stem[len("gnd_"):] if stem.startswith("gnd_") and len(stem) > len("gnd_") else stem


def load_gnd(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a Revisited ground-truth pickle without running code from it.

    Returns ``{"imlist": [str], "qimlist": [str], "gnd": [{"bbx": [4 floats] | None,
    "easy"/"hard"/"junk": int64 arrays}, ...]}`` (other top-level keys are kept as loaded).
    Raises ``FileNotFoundError``, ``UnsafePickleError`` (naming the refused global) or
    ``GroundTruthError`` (naming the query, key and bad value).
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except Exception as exc:  # truncated or not a pickle at all
        state = "is empty (0 bytes)" if not data else (
            f"({len(data):,} bytes) is not a readable ground-truth pickle ({type(exc).__name__}: {exc})")
        raise GroundTruthError(
            f"{path} {state}; it should be a Revisited ground-truth pickle gnd_<name>.pkl (a dict with imlist, "
            "qimlist, gnd): download it again"
        ) from None
    try:
        return validate_gnd(obj)
    except GroundTruthError as exc:
        raise GroundTruthError(f"{path}: {exc}") from None


def _names(obj: Any, key: str) -> list[str]:
    seq = obj.get(key)
    if isinstance(seq, np.ndarray):
        seq = seq.tolist()
    if not isinstance(seq, (list, tuple)) or not all(isinstance(s, str) for s in seq):
        raise GroundTruthError(f"'{key}' must be a list of image names (strings)")
    return list(seq)


def index_array(value: Any, where: str, n_images: int | None) -> np.ndarray:
    """A list/array of image indices as int64, checked (integers, within [0, n_images))."""
    if isinstance(value, np.ndarray):
        arr = value.reshape(-1)
    elif isinstance(value, (list, tuple)):
        try:
            arr = np.asarray(value).reshape(-1) if len(value) else np.zeros(0, np.int64)
        except (ValueError, TypeError):
            arr = np.asarray(list(value) + [None], dtype=object)[:-1]  # ragged: checked item by item
    else:
        raise GroundTruthError(f"{where} must be a list or array of indices, got {type(value).__name__}")
    if arr.dtype.kind in "iu":
        out = arr.astype(np.int64)
    else:
        out = np.empty(arr.shape[0], dtype=np.int64)
        for i, v in enumerate(arr.tolist()):
            if isinstance(v, bool) or not (isinstance(v, (int, np.integer))
                                           or (isinstance(v, float) and v.is_integer())):
                raise GroundTruthError(f"{where} holds {v!r}, not an image index")
            out[i] = int(v)
    if out.size:
        bad = out[(out < 0) | (out >= n_images)] if n_images is not None else out[out < 0]
        if bad.size:
            size = f"imlist of {n_images} images" if n_images is not None else "a non-negative index"
            raise GroundTruthError(f"{where} index {int(bad[0])} is out of range for {size}")
    return out


def _bbx(value: Any, where: str) -> list[float]:
    vals = value.tolist() if isinstance(value, np.ndarray) else value
    if not isinstance(vals, (list, tuple)) or len(vals) != 4 or not all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in vals):
        raise GroundTruthError(f"{where} must be 4 numbers [x1, y1, x2, y2], got {value!r}")
    x1, y1, x2, y2 = (float(v) for v in vals)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or not (x1 < x2 and y1 < y2):
        raise GroundTruthError(f"{where} = {[x1, y1, x2, y2]} is not a box with x1 < x2 and y1 < y2")
    return [x1, y1, x2, y2]


def query_gnd(entries: Any, n_images: int | None = None) -> list[dict[str, Any]]:
    """Validate a list of per-query dicts (``easy``, ``hard``, ``junk``; optional ``bbx``)."""
    if isinstance(entries, Mapping) and "gnd" in entries:
        if n_images is None and "imlist" in entries:
            n_images = len(entries["imlist"])
        entries = entries["gnd"]
    if not isinstance(entries, Sequence) or isinstance(entries, (str, bytes)):
        raise GroundTruthError(f"'gnd' must be a list with one dict per query, got {type(entries).__name__}")
    out = []
    for qi, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise GroundTruthError(f"gnd[{qi}] must be a dict, got {type(entry).__name__}")
        missing = [c for c in CATEGORIES if c not in entry]
        if missing:
            raise GroundTruthError(f"gnd[{qi}] lacks key(s) {missing} (needs easy, hard, junk)")
        clean = dict(entry)
        for c in CATEGORIES:
            clean[c] = index_array(entry[c], f"gnd[{qi}]['{c}']", n_images)
        if entry.get("bbx") is not None:
            clean["bbx"] = _bbx(entry["bbx"], f"gnd[{qi}]['bbx']")
        out.append(clean)
    return out


def validate_gnd(obj: Any) -> dict[str, Any]:
    """Check a loaded ground-truth dict; indices as int64 arrays, boxes as 4 floats."""
    if not isinstance(obj, Mapping):
        raise GroundTruthError(f"expected a dict with imlist, qimlist and gnd, got {type(obj).__name__}")
    missing = [key for key in ("imlist", "qimlist", "gnd") if key not in obj]
    if missing:
        raise GroundTruthError(f"missing key(s) {missing}")
    imlist, qimlist = _names(obj, "imlist"), _names(obj, "qimlist")
    gnd = query_gnd(obj["gnd"], len(imlist))
    if len(gnd) != len(qimlist):
        raise GroundTruthError(f"'gnd' has {len(gnd)} entries but 'qimlist' has {len(qimlist)} queries")
    out = dict(obj)
    out.update(imlist=imlist, qimlist=qimlist, gnd=gnd)
    return out


@dataclass(frozen=True)
class GndEntries:
    """Every (query, database item, category) of a ground truth as flat arrays.

    ``counts[q, c]`` is the length of query q's list for category c (``CATEGORIES`` order),
    duplicates included, as revisitop's ``len(gnd['ok'])`` counts them; ``n_images`` the length
    of imlist when known. Build it once with ``GndEntries.from_gnd`` to skip re-reading the
    ground truth on every evaluation.
    """

    query: np.ndarray
    item: np.ndarray
    category: np.ndarray
    counts: np.ndarray
    n_queries: int
    n_images: int | None = None

    @classmethod
    def from_gnd(cls, gnd: Any) -> "GndEntries":
        """From a ``load_gnd`` dict, its ``"gnd"`` list, or a list of dicts with easy/hard/junk."""
        if isinstance(gnd, GndEntries):
            return gnd
        n_images = None
        if isinstance(gnd, Mapping) and "gnd" in gnd:
            n_images = len(gnd["imlist"]) if gnd.get("imlist") is not None else None
            gnd = gnd["gnd"]
        if not isinstance(gnd, Sequence) or isinstance(gnd, (str, bytes)):
            raise GroundTruthError(f"ground truth must be a list with one dict per query, got {type(gnd).__name__}")
        items, lengths = [], []
        for qi, entry in enumerate(gnd):
            if not isinstance(entry, Mapping):
                raise GroundTruthError(f"gnd[{qi}] must be a dict, got {type(entry).__name__}")
            for cat in CATEGORIES:
                v = entry.get(cat)
                if type(v) is not np.ndarray or v.dtype != np.int64 or v.ndim != 1:  # not already clean
                    if cat not in entry:
                        raise GroundTruthError(f"gnd[{qi}] lacks key '{cat}' (needs easy, hard, junk)")
                    v = index_array(v, f"gnd[{qi}]['{cat}']", None)
                items.append(v)
                lengths.append(v.shape[0])
        flat_counts = np.array(lengths, dtype=np.int64)
        counts = flat_counts.reshape(len(gnd), len(CATEGORIES))
        item = np.concatenate(items) if items else np.zeros(0, np.int64)
        query = np.repeat(np.repeat(np.arange(len(gnd)), len(CATEGORIES)), flat_counts)
        category = np.repeat(np.tile(np.arange(len(CATEGORIES), dtype=np.int8), len(gnd)), flat_counts)
        if item.size:
            bad = (item < 0) if n_images is None else ((item < 0) | (item >= n_images))
            if bad.any():
                e = int(np.argmax(bad))
                size = f"imlist of {n_images} images" if n_images is not None else "an image index"
                raise GroundTruthError(f"gnd[{query[e]}]['{CATEGORIES[category[e]]}'] index {item[e]} "
                                       f"is out of range for {size}")
        return cls(query, item, category, counts, len(gnd), n_images)

    def max_item(self) -> int:
        return int(self.item.max()) if self.item.size else -1
