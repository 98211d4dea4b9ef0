"""Mined hard negatives (CFCD stage 2): a stage-1 model's own mistakes, one row per training image.

For every training image the mining step keeps the ``top_n`` classes *other than its own* that the
stage-1 model scores highest (its "wrong classes", most confusable first), their scores, and the
model's top-1 class (so that a sampler can tell a misclassified anchor from a correct one). The
published CFCD code never released this file, and its sampler needs more than one GPU; this
format is written by one process or by every DDP rank (each writing disjoint chunks) and read by
:class:`datamodules.tuple_sampler.TupleBatchSampler` on any number of devices.

Layout of the folder::

    hard_negatives.json   the header, written first (atomically): format, version, model_fingerprint
                          (:func:`scoring_fingerprint` of the stage-1 model and class weights),
                          data_fingerprint (:func:`training_data_fingerprint`: the training image
                          list and labels), both given by the caller, num_images, num_classes,
                          top_n, chunk_size, chunks, score
                          (what a score means), command (how the folder was mined), extra
    chunks/<c>.npz        chunk c = dataset indices [c * chunk_size, min((c + 1) * chunk_size, N)):
                            indices        int64   (n,)        those indices, ascending
                            wrong_classes  int64   (n, top_n)  class ids in [0, num_classes), never the
                                                               image's own; -1 only at the end of a row
                                                               (fewer than top_n other classes exist),
                                                               or the whole row (an unreadable image)
                            scores         float32 (n, top_n)  their scores (finite; NaN for a -1)
                            predicted      int64   (n,)        the model's top-1 class; -1 for an image
                                                               that could not be read (its row of
                                                               wrong_classes is all -1 then)
    chunks/<c>.json       written after the .npz (both atomically): chunk, start, stop, a BLAKE2b
                          digest of each array, and what the miner added (e.g. the unreadable
                          images). A chunk is finished once its .json exists and its arrays match
                          the digests.

A chunk holds a fixed range of indices, so a run killed at any point (SIGKILL included) loses at
most the chunks in progress: reopening the writer with the same model, data and plan lists the
chunks still missing (:meth:`HardNegativeWriter.missing_chunks`) and the result is the same as an
uninterrupted run's. Under DDP, rank r mines the chunks ``c % world_size == r``
(:meth:`HardNegativeWriter.chunks_for`): every image exactly once, no gathering, no final assembly.
The chunks *are* the output: :func:`load_hard_negatives` reads them in index order and refuses a
folder that is missing, of another model or data, incomplete, damaged or of an unknown version.

The fingerprints are what a stage-2 run recomputes to check the folder is for it:
:func:`scoring_fingerprint` (``model_fingerprint``) of the stage-1 embedding model *and* its class
weights, everything a score depends on but the image pipeline; :func:`training_data_fingerprint`
(``data_fingerprint``) of the datamodule's training images and their class indices and identities.
``python -m sg_train.mine_hard_negatives`` (:mod:`sg_train.mine_hard_negatives`) mines a folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sg_train.errors import UserInputError
from sg_train.files import array_digest, atomic_write, write_json

if TYPE_CHECKING:  # torch only where a fingerprint of a model is taken
    from torch import nn

__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_SCORE", "FORMAT", "VERSION", "HardNegativeWriter", "HardNegatives",
           "HardNegativesError", "data_fingerprint", "load_hard_negatives", "scoring_fingerprint",
           "training_data_fingerprint"]

FORMAT = "sg-train-hard-negatives"
VERSION = 1
HEADER, CHUNKS = "hard_negatives.json", "chunks"
DEFAULT_CHUNK_SIZE = 65536  # images per chunk: 1.6 M GLDv2-clean images make 25 chunks
DEFAULT_SCORE = ("cosine between the image's L2-normalised embedding and the class weight (the classifier logit "
                 "before margin and scale), in [-1, 1]; higher = more confusable")
ARRAYS = ("indices", "wrong_classes", "scores", "predicted")
# compared on reopening a folder, with the fingerprints
_PLAN_KEYS = ("num_images", "num_classes", "top_n", "chunk_size", "score")
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile)


class HardNegativesError(UserInputError):
    """A hard-negative folder that is missing, of another model or data, incomplete, damaged or of
    an unknown format version; or a writer that would replace another mining's files."""


def _short(fingerprint: Any) -> str:
    return str(fingerprint)[:12]


def _chunk_paths(path: Path, chunk: int) -> tuple[Path, Path]:
    return path / CHUNKS / f"{chunk:06d}.npz", path / CHUNKS / f"{chunk:06d}.json"


def _chunk_bounds(header: dict[str, Any], chunk: int) -> tuple[int, int]:
    start = chunk * header["chunk_size"]
    return start, min(start + header["chunk_size"], header["num_images"])


def _rerun(header: dict[str, Any] | None) -> str:
    command = (header or {}).get("command")
    return f"rerun `{command}`" if command else "rerun the hard-negative mining command that wrote it"


def _read_header(path: Path) -> dict[str, Any] | None:
    """The header of ``path``, None if it has none; HardNegativesError if it is unreadable, not this
    format, of an unknown version or lacks a field."""
    file = path / HEADER
    if not file.is_file():
        return None
    try:
        header = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HardNegativesError(f"{file} is unreadable ({type(e).__name__}: {e}); mine the hard negatives again "
                                 "into an empty folder (or overwrite this one)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise HardNegativesError(f"{file} is not a hard-negative header (format {FORMAT!r} expected, found "
                                 f"{header.get('format') if isinstance(header, dict) else type(header).__name__!r}); "
                                 "point to the folder the mining wrote, or mine into another folder")
    if header.get("version") != VERSION:
        raise HardNegativesError(f"{file} is of format version {header.get('version')!r}; this sg-train reads version "
                                 f"{VERSION} only: mine the hard negatives again with this sg-train (or use the "
                                 "sg-train that wrote them)")
    need = ("model_fingerprint", "data_fingerprint", "chunks", *_PLAN_KEYS)
    missing = [key for key in need if key not in header]
    ints = ("num_images", "num_classes", "top_n", "chunk_size", "chunks")
    if missing or any(not isinstance(header[k], int) or isinstance(header[k], bool) for k in ints if k in header) \
            or header["chunk_size"] < 1 or header["chunks"] != -(-header["num_images"] // header["chunk_size"]):
        raise HardNegativesError(f"{file} is damaged (missing {missing}, or num_images/chunk_size/chunks not "
                                 "consistent integers); mine the hard negatives again (overwrite the folder)")
    return header


def _load_chunk(path: Path, header: dict[str, Any], chunk: int) -> tuple[dict[str, np.ndarray] | None, str]:
    """Chunk ``chunk``'s arrays, or ``(None, why)``: ``why`` is "" when it was never finished (no
    record), else what is wrong with a finished one (its data missing, truncated, or not matching)."""
    npz, meta = _chunk_paths(path, chunk)
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError) as e:
        return None, f"{meta.name} is unreadable ({type(e).__name__})"
    start, stop = _chunk_bounds(header, chunk)
    n, top_n = stop - start, header["top_n"]
    try:
        with np.load(npz, allow_pickle=False) as data:
            arrays = {name: data[name] for name in ARRAYS}
    except FileNotFoundError:
        return None, f"{npz.name} is missing although {meta.name} says it was written"
    except _READ_ERRORS as e:
        return None, f"{npz.name} is truncated or unreadable ({type(e).__name__}: {e})"
    expected = {"indices": (np.int64, (n,)), "wrong_classes": (np.int64, (n, top_n)),
                "scores": (np.float32, (n, top_n)), "predicted": (np.int64, (n,))}
    for name, (dtype, shape) in expected.items():
        array = arrays[name]
        if array.dtype != dtype or array.shape != shape:
            return None, f"{npz.name} holds {name} {array.dtype} {array.shape}, expected {np.dtype(dtype)} {shape}"
    digests = record.get("digests") if isinstance(record, dict) else None
    if not isinstance(digests, dict) or any(array_digest(arrays[k]) != digests.get(k) for k in ARRAYS):
        return None, f"{npz.name} does not match the digests in {meta.name}"
    if not np.array_equal(arrays["indices"], np.arange(start, stop, dtype=np.int64)):
        return None, f"{npz.name} holds other indices than {start}..{stop - 1}"
    return arrays, ""


def _check_rows(header: dict[str, Any], wrong_classes: np.ndarray, scores: np.ndarray, predicted: np.ndarray,
                n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arrays as int64/float32/int64 after checking shapes and values (ValueError: a mining bug)."""
    top_n, num_classes = header["top_n"], header["num_classes"]
    wrong_classes, scores, predicted = np.asarray(wrong_classes), np.asarray(scores), np.asarray(predicted)
    if wrong_classes.shape != (n, top_n) or scores.shape != (n, top_n) or predicted.shape != (n,):
        raise ValueError(f"a chunk of {n} images needs wrong_classes and scores of shape ({n}, {top_n}) and predicted "
                         f"({n},), got {wrong_classes.shape}, {scores.shape}, {predicted.shape}")
    if not (np.issubdtype(wrong_classes.dtype, np.integer) and np.issubdtype(predicted.dtype, np.integer)
            and np.issubdtype(scores.dtype, np.floating)):
        raise ValueError(f"wrong_classes and predicted must be integers, scores floats; got {wrong_classes.dtype}, "
                         f"{predicted.dtype}, {scores.dtype}")
    wrong_classes, scores, predicted = (wrong_classes.astype(np.int64), scores.astype(np.float32),
                                        predicted.astype(np.int64))
    valid = wrong_classes >= 0
    if wrong_classes.size and (wrong_classes.min() < -1 or wrong_classes.max() >= num_classes):
        raise ValueError(f"wrong_classes must lie in [0, {num_classes}) (or be -1 for none), got "
                         f"{wrong_classes.min()}..{wrong_classes.max()}")
    if predicted.size and (predicted.min() < -1 or predicted.max() >= num_classes):
        raise ValueError(f"predicted must lie in [0, {num_classes}) (or be -1 for an unreadable image), got "
                         f"{predicted.min()}..{predicted.max()}")
    if (valid[predicted == -1]).any():
        raise ValueError("an unreadable image (predicted -1) has no wrong classes: its row must be all -1")
    if (valid[:, 1:] & ~valid[:, :-1]).any():
        raise ValueError("a -1 (no class) in wrong_classes may only be followed by -1s")
    if not np.isfinite(scores[valid]).all():
        raise ValueError("the scores of wrong classes must be finite")
    ordered = np.sort(np.where(valid, wrong_classes, -1 - np.arange(top_n)), axis=1)  # -1s made distinct
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ValueError("a row of wrong_classes names a class twice")
    return wrong_classes, np.where(valid, scores, np.float32(np.nan)), predicted


# ---------------------------------------------------------------------------- writing
class HardNegativeWriter:
    """Write (or continue writing) a hard-negative folder, chunk by chunk.

    Opening sets the folder up: it writes the header, or checks the one there. A header of the
    same model, data and plan is continued (``missing_chunks`` says what is left); one of another
    model, data set, image or class count, ``top_n``, chunk size or score is refused, naming what
    differs, unless ``overwrite`` (which removes the header and ``chunks/``, nothing else).

    Under DDP: open it on rank 0 first (with ``overwrite`` if wanted), wait at a barrier, then open
    it on the other ranks (without ``overwrite``); each rank writes :meth:`chunks_for` its rank.

    Args:
        path: the folder (created).
        model_fingerprint: the stage-1 model's and class weights' (:func:`scoring_fingerprint`).
        data_fingerprint: the training image list's and labels', in dataset order
            (:func:`training_data_fingerprint`).
        num_images: training images (N >= 1); dataset indices run 0..N-1.
        num_classes: the model's class count (class ids run 0..num_classes-1).
        top_n: wrong classes kept per image (>= 1).
        chunk_size: images per chunk, the unit of resumption and of the DDP split.
        score: what a score means (stored; part of the plan).
        command: the command that mines into this folder, named when the folder is found incomplete.
        extra: more JSON values for the header (e.g. the checkpoint path); not compared on reopening.
        overwrite: start over on a folder of another mining.

    Raises :class:`HardNegativesError` for a folder it must not write into, ValueError for bad sizes.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        model_fingerprint: str,
        data_fingerprint: str,
        num_images: int,
        num_classes: int,
        top_n: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        score: str = DEFAULT_SCORE,
        command: str | None = None,
        extra: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        for name, value in (("num_images", num_images), ("num_classes", num_classes), ("top_n", top_n),
                            ("chunk_size", chunk_size)):
            if isinstance(value, bool) or int(value) != value or int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not model_fingerprint or not data_fingerprint:
            raise ValueError("model_fingerprint and data_fingerprint must be non-empty strings")
        self.path = Path(path)
        self.header: dict[str, Any] = {
            "format": FORMAT, "version": VERSION,
            "model_fingerprint": str(model_fingerprint), "data_fingerprint": str(data_fingerprint),
            "num_images": int(num_images), "num_classes": int(num_classes), "top_n": int(top_n),
            "chunk_size": int(chunk_size), "chunks": -(-int(num_images) // int(chunk_size)),
            "score": str(score), "command": command, "extra": dict(extra or {}),
        }
        self.path.mkdir(parents=True, exist_ok=True)
        self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        if overwrite:
            if (self.path / CHUNKS).is_dir() and not (self.path / CHUNKS).is_symlink():
                shutil.rmtree(self.path / CHUNKS)
            for name in (HEADER, CHUNKS):
                if (self.path / name).exists() or (self.path / name).is_symlink():
                    (self.path / name).unlink()
        try:
            have = _read_header(self.path)
        except HardNegativesError as e:
            raise HardNegativesError(f"{e}; or pass overwrite=True to start over") from None
        if have is None:
            if (self.path / CHUNKS).exists():
                raise HardNegativesError(f"{self.path} has {CHUNKS}/ but no {HEADER}: not a hard-negative folder; "
                                         "refusing to replace it (choose another folder, or pass overwrite=True)")
            write_json(self.path / HEADER, self.header)  # first: the header marks a folder set up
        else:
            self._check(have)
        (self.path / CHUNKS).mkdir(exist_ok=True)

    def _check(self, have: dict[str, Any]) -> None:
        """Refuse to continue a folder of another model, data set or plan."""
        stop = "; choose another folder, or pass overwrite=True to replace it"
        where = f"{self.path} holds hard negatives"
        for key, what in (("model_fingerprint", "another model"), ("data_fingerprint", "another data set")):
            if have[key] != self.header[key]:
                raise HardNegativesError(f"{where} mined with {what} ({key} {_short(have[key])}, now "
                                         f"{_short(self.header[key])}){stop}")
        for key in _PLAN_KEYS:
            if have[key] != self.header[key]:
                hint = f" (pass chunk_size={have[key]} to continue it)" if key == "chunk_size" else ""
                raise HardNegativesError(f"{where} with {key}={have[key]!r}, now {self.header[key]!r}{hint}{stop}")
        self.header = {**self.header, "command": have.get("command"), "extra": have.get("extra", {})}

    @property
    def num_chunks(self) -> int:
        return self.header["chunks"]

    def chunk_range(self, chunk: int) -> range:
        """The dataset indices of ``chunk``."""
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"chunk {chunk} out of range 0..{self.num_chunks - 1}")
        return range(*_chunk_bounds(self.header, chunk))

    def chunks_for(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """The chunks rank ``rank`` of ``world_size`` mines: ``c % world_size == rank``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        return list(range(rank, self.num_chunks, world_size))

    def missing_chunks(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """The chunks of :meth:`chunks_for` that are not finished, ascending. A chunk whose record
        exists but whose data is damaged counts as missing (with a warning): writing it again heals it."""
        missing = []
        for chunk in self.chunks_for(rank, world_size):
            arrays, why = _load_chunk(self.path, self.header, chunk)
            if arrays is None:
                if why:
                    warnings.warn(f"{self.path / CHUNKS}: chunk {chunk} is damaged ({why}); it will be mined again",
                                  stacklevel=2)
                missing.append(chunk)
        return missing

    @property
    def complete(self) -> bool:
        """Whether every chunk (of every rank) is finished."""
        return not self.missing_chunks()

    def write_chunk(self, chunk: int, wrong_classes: np.ndarray, scores: np.ndarray, predicted: np.ndarray,
                    record: dict[str, Any] | None = None) -> None:
        """Write chunk ``chunk``: rows for the indices :meth:`chunk_range` ``(chunk)``, in order.

        Args:
            wrong_classes: integer ``(n, top_n)``: each image's most confusable classes other than
                its own, most confusable first; -1 only at the end of a row.
            scores: float ``(n, top_n)``: their scores (finite where the class is not -1).
            predicted: integer ``(n,)``: the model's top-1 class of each image; -1 for an image that
                could not be read (its wrong_classes all -1).
            record: more JSON values for the chunk's record (e.g. its unreadable images), read back
                with :meth:`chunk_record`.

        The ``.npz`` is written, then its ``.json`` record (each atomically): a kill at any point
        leaves the chunk either finished or not. Raises ValueError for wrong shapes or values.
        """
        rows = self.chunk_range(chunk)
        wrong_classes, scores, predicted = _check_rows(self.header, wrong_classes, scores, predicted, len(rows))
        arrays = {"indices": np.arange(rows.start, rows.stop, dtype=np.int64), "wrong_classes": wrong_classes,
                  "scores": scores, "predicted": predicted}
        npz, meta = _chunk_paths(self.path, chunk)
        atomic_write(npz, lambda fh: np.savez(fh, **arrays))
        write_json(meta, {**(record or {}), "chunk": chunk, "start": rows.start, "stop": rows.stop,
                          "digests": {name: array_digest(array) for name, array in arrays.items()}})

    def chunk_record(self, chunk: int) -> dict[str, Any] | None:
        """The record of chunk ``chunk`` (with what :meth:`write_chunk` was given as ``record``) if
        the chunk is finished and sound, else None."""
        self.chunk_range(chunk)  # IndexError out of range
        if _load_chunk(self.path, self.header, chunk)[0] is None:
            return None
        return json.loads(_chunk_paths(self.path, chunk)[1].read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class HardNegatives:
    """A complete hard-negative folder, in dataset index order.

    Attributes:
        path: the folder.
        wrong_classes: int64 ``(N, top_n)``: image i's most confusable classes other than its own,
            most confusable first; -1 where there is none.
        scores: float32 ``(N, top_n)``: their scores (``header["score"]`` says what they mean; NaN for -1).
        predicted: int64 ``(N,)``: the stage-1 model's top-1 class of each image; -1 for an image
            that could not be read when mining (see :attr:`unreadable`).
        header: the folder's header.
    """

    path: Path
    wrong_classes: np.ndarray
    scores: np.ndarray
    predicted: np.ndarray
    header: dict[str, Any]

    @property
    def num_images(self) -> int:
        return self.header["num_images"]

    @property
    def top_n(self) -> int:
        return self.header["top_n"]

    @property
    def unreadable(self) -> np.ndarray:
        """bool ``(N,)``: the images that could not be read when mining (no prediction, no wrong class)."""
        return self.predicted < 0

    def misclassified(self, labels: np.ndarray) -> np.ndarray:
        """bool ``(N,)``: whether the stage-1 model's top-1 class differs from ``labels`` (int ``(N,)``);
        False for an unreadable image (it has no prediction)."""
        labels = np.asarray(labels)
        if labels.shape != self.predicted.shape:
            raise ValueError(f"labels must have shape {self.predicted.shape}, got {labels.shape}")
        return (self.predicted != labels) & ~self.unreadable


def load_hard_negatives(
    path: str | os.PathLike,
    *,
    model_fingerprint: str,
    data_fingerprint: str,
    mine_command: str | None = None,
) -> HardNegatives:
    """Read the hard negatives mined by the model and on the data given by their fingerprints.

    Args:
        path: the folder :class:`HardNegativeWriter` wrote.
        model_fingerprint: the stage-1 model the training expects them from.
        data_fingerprint: the training data (image list and labels) they must be of.
        mine_command: the command that mines them for this model and data, named in the message
            when they must be mined again.

    Returns the arrays of every image in dataset index order (:class:`HardNegatives`). Raises
    :class:`HardNegativesError`, in one line naming the folder, the cause and the fix, when the
    folder or its header is missing, the header is of another format or an unknown version, they
    were mined with another model or on another data set, chunks are missing (an interrupted
    mining: rerunning it resumes), or a finished chunk is truncated or does not match its digests.
    """
    path = Path(path)
    mine = f"`{mine_command}`" if mine_command else "the hard-negative mining with the stage-1 model"
    if not path.is_dir():
        raise HardNegativesError(f"hard-negative folder {path} not found: mine them first ({mine}), or fix the path")
    header = _read_header(path)
    if header is None:
        raise HardNegativesError(f"{path} holds no hard negatives ({HEADER} is missing): mine them first ({mine}), "
                                 "or fix the path")
    for key, what, now in (("model_fingerprint", "another model", model_fingerprint),
                           ("data_fingerprint", "another data set (image list or labels)", data_fingerprint)):
        if header[key] != now:
            raise HardNegativesError(f"{path} was mined with {what} ({key} {_short(header[key])}, this training's "
                                     f"{_short(now)}): mine them again for this one ({mine}, into another folder or "
                                     "overwriting), or point to the folder mined for it")
    n, top_n = header["num_images"], header["top_n"]
    out = {"wrong_classes": np.empty((n, top_n), np.int64), "scores": np.empty((n, top_n), np.float32),
           "predicted": np.empty(n, np.int64)}
    missing: list[int] = []
    damaged: list[tuple[int, str]] = []
    for chunk in range(header["chunks"]):
        arrays, why = _load_chunk(path, header, chunk)
        if arrays is None:
            (damaged.append((chunk, why)) if why else missing.append(chunk))
            continue
        start, stop = _chunk_bounds(header, chunk)
        for name, array in out.items():
            array[start:stop] = arrays[name]
    if damaged:
        chunk, why = damaged[0]
        also = f" ({len(damaged)} damaged chunks in all, {len(missing)} missing)" if len(damaged) > 1 or missing else ""
        start, stop = _chunk_bounds(header, chunk)
        raise HardNegativesError(f"{path}: chunk {chunk} (images {start}..{stop - 1}) "
                                 f"is damaged: {why}{also}; {_rerun(header)}: it mines damaged and missing chunks "
                                 "again and keeps the good ones")
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise HardNegativesError(f"{path} is incomplete: {len(missing)} of {header['chunks']} chunks are missing "
                                 f"(chunks {shown}; an interrupted mining); {_rerun(header)}: it resumes with only "
                                 "the missing chunks")
    return HardNegatives(path, out["wrong_classes"], out["scores"], out["predicted"], header)


# ---------------------------------------------------------------------------- fingerprints
_SCORING, _DATA = f"{FORMAT}/scoring/1", f"{FORMAT}/data/1"


def scoring_fingerprint(model: nn.Module, loss_fn: nn.Module) -> str:
    """SHA-256 of everything a mined score depends on but the images: the embedding model's
    structure (``repr``: layers and their settings such as a fixed GeM p or ReLU+ alpha), its
    preprocessing (``model.preprocessing``) and every parameter and buffer (name, dtype, shape,
    bytes), and the margin loss's class weights (``loss_fn.weight``, ``loss_fn.k`` sub-centres).

    Args:
        model: the stage-1 :class:`~sg_train.model.EmbeddingModel` (``module.model``).
        loss_fn: its :class:`~sg_train.losses.MarginLoss` (``module.loss_fn``).

    The same value on any device, in train or eval mode, in any memory format: a stage-2 run
    initialised from the stage-1 checkpoint recomputes it from its own ``model`` and ``loss_fn``
    before training changes them. Unlike :func:`sg_train.descriptor_cache.model_fingerprint` it
    leaves out the extraction scales (a score is one forward pass; ``init_from`` lets stage 2 change
    them); the margin loss's type, scale and margin do not enter either (a score is the cosine
    before them).
    """
    import torch  # noqa: PLC0415 - torch only where a model is fingerprinted

    def update(kind: str, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        h.update(f"\n{kind}:{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        h.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # bytes of every dtype (bf16 too)

    preprocessing = json.dumps(getattr(model, "preprocessing", None), sort_keys=True, default=str)
    h = hashlib.sha256(f"{_SCORING}\n{type(model).__qualname__}\n{model!r}\n{preprocessing}".encode())
    for kind, named in (("param", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            update(kind, name, tensor)
    update(f"class weights k={int(getattr(loss_fn, 'k', 1))}", "weight", loss_fn.weight)
    return h.hexdigest()


def data_fingerprint(names: Any, labels: Any, *, num_classes: int, class_ids: Any = None) -> str:
    """SHA-256 of a training set in dataset order: its image names (as the dataset holds them, e.g.
    GLDv2 ids or paths relative to the image folder: moving the folder keeps it), their class
    indices, the class count and, when given, each class's identity (GLDv2 landmark ids or class
    names, in class order).

    Args:
        names: ``(N,)`` strings (a list, or a numpy ``S``/``U`` array as
            :class:`~datamodules.image_dataset.ImageDataset` keeps them; the same names give the
            same digest either way).
        labels: ``(N,)`` integer class indices.
        num_classes: the class count.
        class_ids: the identity of each class in class order (ints or strings), or None.

    Raises ValueError when names and labels differ in length.
    """
    names = np.asarray(names)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if names.ndim != 1 or len(names) != len(labels):
        raise ValueError(f"names and labels must be 1-D of equal length, got {names.shape} and {labels.shape}")
    if names.dtype.kind == "S":  # ASCII (ImageDataset keeps other names as U): the same bytes as encoding them
        encoded = names.tolist()
    else:
        encoded = [str(name).encode("utf-8") for name in names.tolist()]
    ids = None if class_ids is None else [i if isinstance(i, str) else int(i) for i in class_ids]
    h = hashlib.sha256(f"{_DATA}\n{len(labels)} images\n{int(num_classes)} classes\n".encode())
    h.update(json.dumps(ids, separators=(",", ":"), ensure_ascii=True).encode() + b"\n")
    h.update(b"\0".join(encoded) + b"\n")
    h.update(labels.astype("<i8").tobytes())
    return h.hexdigest()


def training_data_fingerprint(datamodule: Any) -> str:
    """:func:`data_fingerprint` of a training datamodule
    (:class:`~datamodules.classification.ImageClassificationDataModule`) after ``setup("fit")``:
    ``train_dataset``'s names and labels, ``num_classes`` and ``landmark_ids`` (GLDv2) or else
    ``class_names``. The images stage 2 samples, so it refuses hard negatives mined on others.

    Raises ValueError when the datamodule has no training set yet.
    """
    dataset = getattr(datamodule, "train_dataset", None)
    if dataset is None:
        raise ValueError(f"{type(datamodule).__name__} has no training set yet: call its setup('fit') first")
    class_ids = datamodule.landmark_ids
    if class_ids is None:
        class_ids = datamodule.class_names
    return data_fingerprint(dataset.names, dataset.labels, num_classes=datamodule.num_classes, class_ids=class_ids)
