"""Embed image files with a trained model into a folder of descriptors (resumable).

    python -m sg_train.embed CKPT IMAGES... --out DIR [--batch-size N] [--recursive] [--overwrite]

IMAGES are files and folders. A folder gives its image files
(:data:`sg_train.image_io.IMAGE_EXTENSIONS`, any letter case; hidden files and folders left out),
sorted by path; with ``--recursive`` those of its sub-folders too. Other files in a folder are
skipped and counted; a file named on the command line is always tried. Descriptors are made by
:class:`sg_train.embedder.Embedder` (the retrieval evaluation's preprocessing for a database image
under the evaluation protocol, ``--protocol``, default "revisitop").

Layout of ``DIR`` once finished::

    descriptors.npy   float32 (N, D), row r = line r of files.txt, rows L2-normalised
    files.txt         the N embedded files (absolute paths), one per line, UTF-8, "\\n"-separated
    skipped.tsv       ``path<TAB>reason`` of every image that could not be read (header line first)
    embed.json        written last: format, checkpoint, model fingerprint, protocol, scales, count,
                      dim, skipped; a folder with it is finished and never overwritten without --overwrite

When no image can be read, the run ends with an error naming a few and ``skipped.tsv`` (written,
with every reason); nothing else is, and the folder stays an unfinished run.

While it runs, ``DIR/chunks/`` holds ``plan.json`` (model fingerprint, protocol, file list digest,
chunk size), ``planned.txt`` (every file to embed) and per chunk of ``--chunk-size`` files
``<c>.npy`` (its descriptors) and ``<c>.json`` (written after the ``.npy``, both atomically: the
files that could not be read and a BLAKE2b digest of the rows). A run that dies, even by SIGKILL,
loses at most the chunk in progress; the same command continues from the first unfinished chunk
and produces the same arrays as a run never interrupted (with the same ``--batch-size`` and device:
another batch size changes only float summation order). Continuing with another model, protocol,
file list or chunk size is refused (``--overwrite`` starts over). ``chunks/`` is removed once
``embed.json`` is written. One process at a time: an advisory lock on ``DIR`` guards it.

Bad input: one line on stderr and exit status 1; a bug: its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sg_train.errors import UserInputError, user_error_line
from sg_train.files import array_digest, atomic_write, why_not_a_folder, write_json
from sg_train.image_io import IMAGE_EXTENSIONS
from sg_train.progress import progress_bar

if TYPE_CHECKING:  # the CLI parses its arguments before importing torch
    from sg_train.embedder import Embedder

__all__ = ["DEFAULT_CHUNK_SIZE", "EmbedOutputError", "Embeddings", "ImageFiles",
           "collect_images", "embed_files", "main"]

FORMAT = "sg-train-embeddings"
VERSION = 1
DEFAULT_CHUNK_SIZE = 1024
DESCRIPTORS, FILES, SKIPPED, RECORD, CHUNKS = "descriptors.npy", "files.txt", "skipped.tsv", "embed.json", "chunks"
PLAN, PLANNED = "plan.json", "planned.txt"
OUTPUTS = (RECORD, DESCRIPTORS, FILES, SKIPPED, CHUNKS)

class EmbedOutputError(UserInputError):
    """An output folder that is finished, belongs to another embedding, or is not one at all (a file)."""


# ---------------------------------------------------------------------------- the file list
@dataclass(frozen=True)
class ImageFiles:
    """The image files to embed.

    Attributes:
        files: absolute paths, in order: the inputs in the order given, a folder's files sorted.
        non_images: ``{extension: count}`` of folder files left out for their extension
            ("" for files without one).
        duplicates: files named more than once (kept at their first place).
    """

    files: list[str]
    non_images: dict[str, int]
    duplicates: int


def _check_listable(path: str) -> str:
    """``path`` if it can be one line of UTF-8 files.txt / skipped.tsv, else UserInputError naming it."""
    if any(c in path for c in "\n\r\t"):
        raise UserInputError(f"file name {path!r} holds a line break or tab, which files.txt and skipped.tsv cannot "
                             "list; rename the file or move it out of the input")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UserInputError(f"file name {path.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8 and cannot be "
                             "written to files.txt; rename the file (e.g. convmv -f latin1 -t utf8)") from None
    return path


def collect_images(inputs: Sequence[str | os.PathLike], *, recursive: bool = False,
                   check_name: Callable[[str], str] = _check_listable) -> ImageFiles:
    """The image files named by ``inputs`` (files and folders; see the module docstring).

    ``check_name`` is applied to each file's absolute path: it returns the path or raises
    :class:`~sg_train.errors.UserInputError` naming it. The default is embed's: a name files.txt
    and skipped.tsv can hold (no line break, no tab, valid UTF-8). Raises FileNotFoundError for an
    input that does not exist.
    """
    files: list[str] = []
    non_images: Counter[str] = Counter()
    for given in inputs:
        path = os.path.abspath(os.fspath(given))
        if os.path.isdir(path):
            found: list[str] = []
            for folder, subfolders, names in os.walk(path, followlinks=True):
                subfolders[:] = [] if not recursive else sorted(d for d in subfolders if not d.startswith("."))
                for name in names:
                    if name.startswith("."):  # hidden: .DS_Store, sg-train's own .sg-train/ split files
                        continue
                    extension = os.path.splitext(name)[1].lower()
                    if extension in IMAGE_EXTENSIONS:
                        found.append(os.path.join(folder, name))
                    else:
                        non_images[extension] += 1
            files.extend(sorted(found))
        elif os.path.exists(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {given} (give image files or folders)")
    unique = list(dict.fromkeys(files))
    return ImageFiles([check_name(f) for f in unique], dict(sorted(non_images.items())), len(files) - len(unique))


def _positive_int(value: Any, what: str) -> int:
    """``value`` as an int if it is a positive integer, else UserInputError naming ``what``."""
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise UserInputError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _digest_lines(lines: Sequence[str]) -> str:
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode("utf-8")).hexdigest()


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    atomic_write(path, lambda fh: fh.write("".join(f"{line}\n" for line in lines).encode("utf-8")))


def _read_lines(path: Path) -> list[str]:
    # split("\n"), not splitlines(): a file name may hold \x85, \u2028 and other Unicode line breaks.
    text = path.read_text(encoding="utf-8")
    return text.split("\n")[:-1] if text else []


# ---------------------------------------------------------------------------- the output folder
def _check_out_dir(out_dir: Path) -> None:
    """EmbedOutputError if ``out_dir`` is a file or lies inside one (it could not be made a folder)."""
    why = why_not_a_folder(out_dir)
    if why is not None:
        raise EmbedOutputError(f"--out {out_dir} {why}; choose another --out (a folder, created if missing); "
                               "nothing was written")


# ---------------------------------------------------------------------------- a finished output
@dataclass(frozen=True)
class Embeddings:
    """A finished embedding folder.

    Attributes:
        out_dir: the folder.
        descriptors: float32 ``(N, D)``, read-only memory map; row r is ``files[r]``.
        files: the embedded files (N).
        skipped: ``[(path, reason)]`` of the images that could not be read.
        record: the contents of ``embed.json``.
    """

    out_dir: Path
    descriptors: np.ndarray
    files: list[str]
    skipped: list[tuple[str, str]]
    record: dict[str, Any]

    @classmethod
    def open(cls, out_dir: str | os.PathLike) -> Embeddings:
        """Read a finished folder; :class:`EmbedOutputError` naming the file at fault if it is
        unfinished, damaged or not an ``sg_train.embed`` output (a file, or a path inside one),
        FileNotFoundError if there is nothing at ``out_dir``."""
        out_dir = Path(out_dir)
        if not out_dir.is_dir():
            why = why_not_a_folder(out_dir)
            if why is not None:
                raise EmbedOutputError(f"embedding folder {out_dir} {why}; give the folder that "
                                       "python -m sg_train.embed wrote (its --out)")
            raise FileNotFoundError(f"embedding folder not found: {out_dir}")
        record = _read_record(out_dir)
        if record is None:
            hint = (" (an unfinished run: rerun the same python -m sg_train.embed command to finish it)"
                    if (out_dir / CHUNKS / PLAN).exists()
                    else " (make one with python -m sg_train.embed CKPT IMAGES --out DIR)")
            raise EmbedOutputError(f"{out_dir} holds no finished embedding: {RECORD} is missing{hint}")
        try:
            descriptors = np.load(out_dir / DESCRIPTORS, mmap_mode="r", allow_pickle=False)
            files = _read_lines(out_dir / FILES)
            skipped_lines = _read_lines(out_dir / SKIPPED)[1:]
        except (OSError, ValueError) as e:
            raise EmbedOutputError(f"{out_dir} is damaged ({type(e).__name__}: {e}); "
                                   "embed again with --overwrite") from None
        missing = [key for key in ("count", "dim", "model_fingerprint", "eval_protocol") if key not in record]
        if missing or not isinstance(record["count"], int) or not isinstance(record["dim"], int):
            raise EmbedOutputError(f"{out_dir / RECORD} is damaged (missing {missing}, or count/dim not integers); "
                                   "embed again with --overwrite")
        shape = (record["count"], record["dim"])
        if descriptors.dtype != np.float32 or descriptors.shape != shape or len(files) != shape[0]:
            raise EmbedOutputError(f"{out_dir} is damaged: {DESCRIPTORS} is {descriptors.dtype} "
                                   f"{descriptors.shape} and {FILES} lists {len(files)} files, {RECORD} says "
                                   f"float32 {shape}; embed again with --overwrite")
        skipped = [tuple(line.split("\t", 1)) for line in skipped_lines]
        return cls(out_dir, descriptors, files, skipped, record)  # type: ignore[arg-type]


def _read_json(path: Path, what: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EmbedOutputError(f"{path} is unreadable ({e}); pass --overwrite to start over") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EmbedOutputError(f"{path} is not an sg_train.embed {what} (format {FORMAT!r} expected); choose another "
                               "--out, or pass --overwrite to replace the folder's embedding files")
    return data


def _read_record(out_dir: Path) -> dict[str, Any] | None:
    return _read_json(out_dir / RECORD, "record")


# ---------------------------------------------------------------------------- plan, then do
@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """An exclusive advisory lock on the folder itself (no lock file is left behind)."""
    import fcntl  # noqa: PLC0415 - POSIX only, like the R1M extraction

    fd = os.open(out_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EmbedOutputError(f"another process is embedding into {out_dir}") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _plan(embedder: Embedder, files: list[str], chunk_size: int) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": VERSION,
        "checkpoint": None if embedder.checkpoint is None else os.path.abspath(embedder.checkpoint),
        "model_fingerprint": embedder.fingerprint, "eval_protocol": embedder.protocol.describe(),
        "dim": embedder.embedding_dim, "files": len(files), "files_digest": _digest_lines(files),
        "chunk_size": chunk_size, "chunks": -(-len(files) // chunk_size),
    }


def _first_difference(before: list[str], now: list[str]) -> str:
    for i, (a, b) in enumerate(zip(before, now)):
        if a != b:
            return f"first difference at file {i + 1}: {a!r} then, {b!r} now"
    return f"the lists agree for {min(len(before), len(now))} files, then one ends"


def _check_plan(out_dir: Path, have: dict[str, Any], want: dict[str, Any], files: list[str]) -> None:
    """Refuse to continue an unfinished embedding of another model, protocol, file list or chunk size."""
    stop = ("; continue it with the command that started it, choose another --out, or pass --overwrite to "
            "start over")
    if have.get("version") != want["version"]:
        raise EmbedOutputError(f"{out_dir} holds an unfinished embedding of format version {have.get('version')}, "
                               f"this sg-train writes version {want['version']}{stop}")
    if have["model_fingerprint"] != want["model_fingerprint"] or have["eval_protocol"] != want["eval_protocol"]:
        raise EmbedOutputError(
            f"{out_dir} holds an unfinished embedding by another model or protocol (checkpoint {have['checkpoint']}, "
            f"fingerprint {have['model_fingerprint'][:12]}, protocol {have['eval_protocol']['name']} with scales "
            f"{have['eval_protocol']['scales']}; now {want['checkpoint']}, {want['model_fingerprint'][:12]}, "
            f"{want['eval_protocol']['name']} with scales {want['eval_protocol']['scales']}){stop}")
    if have["files_digest"] != want["files_digest"]:
        before = _read_lines(out_dir / CHUNKS / PLANNED)
        raise EmbedOutputError(f"{out_dir} holds an unfinished embedding of another file list ({have['files']} files "
                               f"then, {want['files']} now; {_first_difference(before, files)}){stop}")
    if have["chunk_size"] != want["chunk_size"]:
        raise EmbedOutputError(f"{out_dir} holds an unfinished embedding in chunks of {have['chunk_size']} files, "
                               f"not {want['chunk_size']}: pass --chunk-size {have['chunk_size']} to continue it{stop}")


def _refuse_finished(out_dir: Path) -> None:
    """EmbedOutputError if ``out_dir`` holds a finished embedding (it is never replaced without --overwrite)."""
    record = _read_record(out_dir) if out_dir.is_dir() else None
    if record is not None:
        raise EmbedOutputError(f"{out_dir} holds a finished embedding ({record.get('count')} images by checkpoint "
                               f"{record.get('checkpoint')}); pass --overwrite to replace it, or choose another --out")


def _prepare(out_dir: Path, want: dict[str, Any], files: list[str], overwrite: bool) -> None:
    """Start over (``overwrite``), check an unfinished embedding against ``want``, or set a new one up."""
    if overwrite:
        for name in OUTPUTS:
            path = out_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    _refuse_finished(out_dir)
    have = _read_json(out_dir / CHUNKS / PLAN, "plan")
    if have is not None:
        _check_plan(out_dir, have, want, files)
        return
    leftovers = [name for name in OUTPUTS if (out_dir / name).exists()]
    if leftovers:
        raise EmbedOutputError(f"{out_dir} has {leftovers} but no {RECORD} nor {CHUNKS}/{PLAN}: not an output of "
                               "sg_train.embed; refusing to overwrite them (choose another --out, or pass --overwrite)")
    (out_dir / CHUNKS).mkdir()
    _write_lines(out_dir / CHUNKS / PLANNED, files)
    write_json(out_dir / CHUNKS / PLAN, want)  # last: the plan marks a folder set up completely


def _chunk_paths(out_dir: Path, chunk: int) -> tuple[Path, Path]:
    return out_dir / CHUNKS / f"{chunk:06d}.npy", out_dir / CHUNKS / f"{chunk:06d}.json"


def _finished_chunk(out_dir: Path, chunk: int, dim: int) -> dict[str, Any] | None:
    """The record of a finished chunk whose rows match their digest, else None (redo it; with a
    warning when a record exists but its rows are missing or damaged)."""
    npy, meta = _chunk_paths(out_dir, chunk)
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no record: the chunk never finished
    try:
        rows = np.load(npy, allow_pickle=False)
        if rows.dtype == np.float32 and rows.shape == (record["rows"], dim) and array_digest(rows) == record["digest"]:
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    warnings.warn(f"{npy} does not match its record {meta.name}; embedding chunk {chunk} again", stacklevel=3)
    return None


def _run_chunk(embedder: Embedder, out_dir: Path, chunk: int, files: list[str], batch_size: int) -> dict[str, Any]:
    """Embed one chunk's files and write ``<c>.npy`` then ``<c>.json`` (each atomically)."""
    rows, descriptors, unreadable = embedder.embed_readable(files, batch_size=batch_size)
    npy, meta = _chunk_paths(out_dir, chunk)
    atomic_write(npy, lambda fh: np.save(fh, descriptors, allow_pickle=False))
    record = {"chunk": chunk, "rows": int(len(rows)), "digest": array_digest(descriptors),
              "skipped": [[files[i], err.reason] for i, err in unreadable]}
    write_json(meta, record)
    return record


def _finish(out_dir: Path, plan: dict[str, Any], files: list[str], records: list[dict[str, Any]],
            extra: dict[str, Any]) -> None:
    """Write skipped.tsv, then assemble the chunks into descriptors.npy and files.txt and write
    embed.json; UserInputError (after skipped.tsv) when no image could be read."""
    dim = plan["dim"]
    skipped = [(path, reason) for r in records for path, reason in r["skipped"]]
    dropped = {path for path, _ in skipped}
    kept = [f for f in files if f not in dropped]
    count = sum(r["rows"] for r in records)
    if count != len(kept):  # chunk records disagree with the plan: never write a misaligned output
        raise EmbedOutputError(f"{out_dir / CHUNKS} holds {count} rows for {len(kept)} readable files; "
                               "pass --overwrite")
    _write_lines(out_dir / SKIPPED,
                 ["path\treason"] + [f"{path}\t{' '.join(reason.split())}" for path, reason in skipped])
    if not kept:  # no descriptor: nothing finished to write (the folder stays an unfinished run)
        where = os.path.commonpath([os.path.dirname(f) for f in files])
        reasons = "; ".join(f"{path}: {' '.join(reason.split())}" for path, reason in skipped[:3])
        more = "; ..." if len(skipped) > 3 else ""
        raise UserInputError(f"none of the {len(files)} image{'s' if len(files) > 1 else ''} under {where} could be "
                             f"read ({reasons}{more}; every one in {out_dir / SKIPPED}); nothing was embedded: repair "
                             "or replace the images and run again with --overwrite, or give others")

    def write_descriptors(fh: Any) -> None:  # streamed chunk by chunk: never the whole matrix in memory
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (count, dim)}
        np.lib.format.write_array_header_2_0(fh, header)
        for chunk in range(plan["chunks"]):
            fh.write(np.ascontiguousarray(np.load(_chunk_paths(out_dir, chunk)[0]), dtype="<f4").tobytes())

    atomic_write(out_dir / DESCRIPTORS, write_descriptors)
    _write_lines(out_dir / FILES, kept)
    write_json(out_dir / RECORD, {
        "format": FORMAT, "version": VERSION, "checkpoint": plan["checkpoint"],
        "model_fingerprint": plan["model_fingerprint"], "eval_protocol": plan["eval_protocol"],
        "scales": plan["eval_protocol"]["scales"], "count": count, "dim": dim, "dtype": "float32",
        "skipped": len(skipped), "files_digest": _digest_lines(kept), **extra,
    })
    shutil.rmtree(out_dir / CHUNKS)


def embed_files(
    embedder: Embedder,
    files: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 32,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    on_chunk_done: Callable[[int], None] | None = None,
    record_extra: dict[str, Any] | None = None,
) -> Embeddings:
    """Embed ``files`` into ``out_dir`` (created), or continue an unfinished run there.

    Args:
        embedder: the model (:func:`sg_train.embedder.load_model`).
        files: image files, in the row order wanted (e.g. :func:`collect_images`); each must be
            listable (no line break or tab in its name).
        out_dir: the output folder (layout in the module docstring).
        batch_size: images per forward pass (at most).
        chunk_size: files per chunk, the unit of resumption.
        overwrite: start over: remove ``out_dir``'s descriptors.npy, files.txt, skipped.tsv,
            embed.json and chunks/ (nothing else in it) first.
        progress: a progress bar over the files.
        on_chunk_done: called with the chunk number once its files are written.
        record_extra: more JSON values for ``embed.json`` (e.g. what the file search left out).

    Unreadable images are skipped, counted and listed in ``skipped.tsv``; they never stop the run,
    but when none could be read :class:`~sg_train.errors.UserInputError` names a few and
    ``skipped.tsv`` (no embedding is finished). Raises :class:`EmbedOutputError` for an ``out_dir``
    that is a file or inside one, a finished output (without ``overwrite``), an unfinished one of
    another model, protocol, file list or chunk size, files of other origin in ``out_dir``, or
    another process embedding into it;
    :class:`~sg_train.errors.UserInputError` for no files and a ``batch_size`` or ``chunk_size``
    that is not a positive integer.
    """
    files = [_check_listable(os.fspath(f)) for f in files]
    if not files:
        raise UserInputError("no image files to embed")
    if len(set(files)) != len(files):
        raise UserInputError("the file list names some files more than once; de-duplicate it (collect_images does)")
    batch_size = _positive_int(batch_size, "batch_size")
    chunk_size = _positive_int(chunk_size, "chunk_size")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir):
        plan = _plan(embedder, files, chunk_size)
        _prepare(out_dir, plan, files, overwrite)
        records: list[dict[str, Any] | None] = [_finished_chunk(out_dir, c, plan["dim"]) for c in range(plan["chunks"])]
        done = sum(min(chunk_size, len(files) - c * chunk_size) for c, r in enumerate(records) if r is not None)
        with progress_bar(total=len(files), initial=done, desc="embed", unit="img", enabled=progress) as bar:
            for c, record in enumerate(records):
                if record is not None:
                    continue
                part = files[c * chunk_size:(c + 1) * chunk_size]
                records[c] = _run_chunk(embedder, out_dir, c, part, batch_size)
                bar.update(len(part))
                if on_chunk_done is not None:
                    on_chunk_done(c)
        _finish(out_dir, plan, files, records, dict(record_extra or {}))  # type: ignore[arg-type]
    return Embeddings.open(out_dir)


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sg_train.embed",
        description="Embed image files with an sg-train checkpoint: DIR/descriptors.npy (float32, N x D, rows "
                    "L2-normalised), DIR/files.txt (row order), DIR/skipped.tsv, DIR/embed.json. Resumable: run "
                    "the same command again after an interruption.")
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="an sg-train checkpoint (train.py), e.g. runs/x/checkpoints/last.ckpt")
    parser.add_argument("images", metavar="IMAGES", nargs="+",
                        help="image files and folders (a folder: its image files, sorted)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--recursive", action="store_true", help="also take the images of sub-folders")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (default 32)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="N",
                        help=f"images per chunk, the unit of resumption (default {DEFAULT_CHUNK_SIZE})")
    parser.add_argument("--protocol", default="revisitop", metavar="NAME",
                        help="evaluation protocol whose preprocessing is used: revisitop (default) or superglobal")
    parser.add_argument("--scales", type=float, nargs="+", metavar="S",
                        help="extraction scales (default: the protocol's)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over: remove DIR's descriptors.npy, files.txt, skipped.tsv, embed.json, chunks/")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _positive_int(args.batch_size, "--batch-size")  # every option before the output folder and the model
        _positive_int(args.chunk_size, "--chunk-size")
        from sg_train.devices import resolve_device  # noqa: PLC0415 - torch only once the arguments parse
        from sg_train.eval_protocols import get_protocol  # noqa: PLC0415
        from sg_train.model import check_scales  # noqa: PLC0415

        get_protocol(args.protocol)
        device = resolve_device(args.device)
        if args.scales is not None:
            check_scales(args.scales, "--scales")
        found = collect_images(args.images, recursive=args.recursive)
        if not found.files:
            raise UserInputError(f"no image files in {args.images} (extensions: {' '.join(sorted(IMAGE_EXTENSIONS))}"
                                 f"{'' if args.recursive else '; sub-folders need --recursive'})")
        _check_out_dir(Path(args.out))  # before the model is loaded
        if not args.overwrite:
            _refuse_finished(Path(args.out))
        from sg_train.embedder import load_model  # noqa: PLC0415 - torch only once the arguments are good

        embedder = load_model(args.checkpoint, protocol=args.protocol, scales=args.scales, device=device)
        result = embed_files(embedder, found.files, args.out, batch_size=args.batch_size, chunk_size=args.chunk_size,
                             overwrite=args.overwrite, progress=not args.no_progress,
                             record_extra={"non_image_files": found.non_images, "duplicates": found.duplicates})
    except Exception as exc:
        line = user_error_line(exc)  # re-raises a bug with its traceback
        print(f"sg_train.embed: error: {line}", file=sys.stderr)
        return 1
    left_out = sum(found.non_images.values())
    by_extension = ", ".join(f"{extension or 'no extension'}: {n}" for extension, n in found.non_images.items())
    notes = [f"{len(result.skipped)} unreadable (see {result.out_dir / SKIPPED})" if result.skipped else "",
             f"{left_out} non-image files left out ({by_extension})" if left_out else "",
             f"{found.duplicates} duplicate inputs left out" if found.duplicates else ""]
    print(f"embedded {len(result.files)} images -> {result.out_dir / DESCRIPTORS} "
          f"({result.descriptors.shape[0]} x {result.descriptors.shape[1]} float32)"
          + "".join(f"; {n}" for n in notes if n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
