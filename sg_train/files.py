"""Durable files: atomic writes (a reader sees the old file or the new one, never half of one),
strict JSON (never a bare ``NaN``), content digests of arrays written to disk (to tell a
damaged file from a good one), and why a path cannot be an output folder (checked before any work)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["array_digest", "atomic_write", "why_not_a_folder", "write_json"]


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` through ``write(file)`` into a temporary sibling, fsync, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _json_safe(obj: Any) -> Any:
    """``obj`` with only JSON types left: every non-finite float (Python or numpy) becomes ``None``.

    Dicts (keys turned into ``str``), lists and tuples are converted recursively; numpy scalars
    become Python ``bool``/``int``/``float``, numpy arrays nested lists. Anything else is returned
    as is (``json.dumps`` then says what it cannot write).
    """
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` to ``path`` as strict JSON (indent 2, trailing newline), atomically.

    Non-finite floats are written as ``null`` (see ``_json_safe``), so the file is valid JSON
    for every reader (``NaN`` is not JSON). Raises ``TypeError`` for values JSON has no type for.
    """
    text = json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def array_digest(array: np.ndarray) -> str:
    """BLAKE2b (128-bit) hex digest of an array's bytes in C order."""
    return hashlib.blake2b(np.ascontiguousarray(array).view(np.uint8).reshape(-1), digest_size=16).hexdigest()


def why_not_a_folder(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a folder, worded to follow its name ("is a file, not a folder", "is
    inside X, which is a file, not a folder"), or None when it is one or can be made one (the
    nearest of it and its parents that exists is a folder). Output options check their path with it
    before any work, each raising its own error with its own fix."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return None
        if os.path.lexists(candidate):
            what = f"{'a file, ' if candidate.is_file() else ''}not a folder"
            return f"is {what}" if candidate == path else f"is inside {candidate}, which is {what}"
    return None
