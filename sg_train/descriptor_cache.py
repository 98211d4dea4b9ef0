"""On-disk cache of descriptor matrices, keyed by a JSON description of model and data.

An entry is two files in ``cache_dir``: ``<hash>.npy`` (the matrix, float32 or float16) and
``<hash>.json`` (the key itself, the matrix's shape/dtype and a BLAKE2b digest of its bytes).
``<hash>`` is the SHA-256 of the key's canonical JSON. Both files are written to a temporary
name and renamed into place (atomic on POSIX), the matrix first, so a reader sees either a
whole entry or none. A reader checks the stored key, shape, dtype and digest; anything that
does not match (a corrupt or truncated file, a hash collision) is recomputed with a warning,
never returned.

Keys are :func:`descriptor_key`: ``{"model": model_fingerprint(m), "eval_protocol":
protocol.describe(), "data": dataset_fingerprint(ds)}``. :func:`model_fingerprint` hashes every
parameter and buffer and the model's preprocessing; the evaluation protocol
(:mod:`sg_train.eval_protocols`: crop rule, scales, resize, size cap, colours) is in the key with
every setting, so descriptors of one protocol are never returned for another;
:func:`dataset_fingerprint` hashes the dataset's description (names, boxes, preprocessing,
max_size, its protocol) and every image file's size and modification time.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .eval_protocols import EvalProtocol, get_protocol
from .files import array_digest, atomic_write, write_json

__all__ = ["CacheEntryWarning", "DescriptorCache", "canonical_json", "dataset_fingerprint", "descriptor_key",
           "model_fingerprint"]

DTYPES = ("float32", "float16")


class CacheEntryWarning(UserWarning):
    """A cache entry that could not be used and is recomputed."""


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces); ``TypeError`` names what is not JSON-able."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"cache key must be plain JSON (dicts, lists, strings, finite numbers): {e}") from None


def _tensor_bytes(t: Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())  # byte view works for every dtype (bf16 too)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's structure (``repr``: layers and their settings such as fixed
    GeM p or ReLU+ alpha), every parameter and buffer (name, dtype, shape, bytes), and its
    preprocessing (``model.preprocessing``, or ``input_format``/``mean``/``std``/``scales``)."""
    h = hashlib.sha256()
    h.update(type(model).__qualname__.encode())
    h.update(repr(model).encode())
    prep = getattr(model, "preprocessing", None)
    if prep is None:
        prep = {k: getattr(model, k) for k in ("input_format", "mean", "std") if hasattr(model, k)}
    extra = {"preprocessing": prep, "scales": getattr(model, "scales", None)}
    h.update(canonical_json(_jsonable(extra)).encode())
    for kind, named in (("param", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, t in named:
            h.update(f"{kind}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


def dataset_fingerprint(dataset: Any) -> str:
    """SHA-256 over ``dataset.describe()`` (name, split, image names, boxes, max_size,
    preprocessing) and every file in ``dataset.paths`` with its size and mtime (ns), so that a
    replaced image invalidates the fingerprint. A missing file raises ``FileNotFoundError``."""
    h = hashlib.sha256()
    h.update(type(dataset).__qualname__.encode())
    h.update(canonical_json(_jsonable(dataset.describe())).encode())
    for path in dataset.paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image {path} of the dataset no longer exists") from None
        h.update(f"\n{path}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def descriptor_key(model_fp: str, dataset: Any, protocol: str | EvalProtocol) -> dict[str, Any]:
    """The cache key of ``dataset``'s descriptors by the model with fingerprint ``model_fp``
    (:func:`model_fingerprint`, computed once by the caller: it reads every weight) under the
    evaluation ``protocol`` (a name or an ``EvalProtocol``; all its settings go into the key)."""
    return {"model": model_fp, "eval_protocol": get_protocol(protocol).describe(),
            "data": dataset_fingerprint(dataset)}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


class DescriptorCache:
    """Descriptor matrices on disk, computed once per key.

    Args:
        cache_dir: folder for the entries (created if missing).
        dtype: storage type, "float32" or "float16" (half the disk; the value returned on the
            first call is rounded through float16 too, so a hit returns exactly what a miss did).
    """

    def __init__(self, cache_dir: str | os.PathLike, *, dtype: Literal["float32", "float16"] = "float32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.cache_dir = Path(cache_dir)
        self.dtype = dtype
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def key_hash(self, key: dict) -> str:
        """The entry name of ``key`` (SHA-256 of its canonical JSON with the storage dtype)."""
        return hashlib.sha256(canonical_json({"key": key, "dtype": self.dtype}).encode()).hexdigest()

    def paths(self, key: dict) -> tuple[Path, Path]:
        """``(<hash>.npy, <hash>.json)`` of ``key``."""
        name = self.key_hash(key)
        return self.cache_dir / f"{name}.npy", self.cache_dir / f"{name}.json"

    def load(self, key: dict) -> Tensor | None:
        """The stored matrix (float32 tensor) or None when absent or unusable (with a warning)."""
        npy, meta_path = self.paths(key)
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("key") != json.loads(canonical_json(key)):
                raise ValueError("stored key differs from the requested key")
            array = np.load(npy, allow_pickle=False)
            if array.dtype != np.dtype(self.dtype) or list(array.shape) != meta["shape"]:
                raise ValueError(f"stored array is {array.dtype} {list(array.shape)}, "
                                 f"the record says {self.dtype} {meta['shape']}")
            if array_digest(array) != meta["digest"]:
                raise ValueError("content digest mismatch (corrupt file)")
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
            warnings.warn(f"descriptor cache entry {npy} is unusable ({type(e).__name__}: {e}); recomputing",
                          CacheEntryWarning, stacklevel=3)
            return None
        return torch.from_numpy(array.astype(np.float32))

    def store(self, key: dict, descriptors: Tensor) -> Tensor:
        """Write ``descriptors`` (2-D) under ``key``; returns them as stored (float32 tensor)."""
        if not isinstance(descriptors, Tensor) or descriptors.ndim != 2:
            raise ValueError(f"descriptors must be a 2-D tensor, got {type(descriptors).__name__} "
                             f"{tuple(getattr(descriptors, 'shape', ()))}")
        with np.errstate(over="ignore"):  # overflow is reported below, naming the cause
            array = np.ascontiguousarray(descriptors.detach().to("cpu", torch.float32).numpy().astype(self.dtype))
        if not np.isfinite(array).all():
            raise ValueError("descriptors hold non-finite values" + (
                " after the cast to float16 (values beyond 65504)" if self.dtype == "float16" else ""))
        npy, meta_path = self.paths(key)
        meta = {"key": json.loads(canonical_json(key)), "dtype": self.dtype, "shape": list(array.shape),
                "digest": array_digest(array)}
        atomic_write(npy, lambda fh: np.save(fh, array, allow_pickle=False))
        write_json(meta_path, meta)
        return torch.from_numpy(array.astype(np.float32))

    def get_or_compute(self, key: dict, compute: Callable[[], Tensor]) -> Tensor:
        """The matrix stored under ``key``, or ``compute()`` stored and returned (float32, CPU)."""
        canonical_json(key)  # fail early on a key that is not JSON
        cached = self.load(key)
        if cached is not None:
            return cached
        return self.store(key, compute())
