"""Your own labelled photos: class folders or an OML-style CSV, and a seeded held-out split.

Two inputs (docs/design.md §5):

* **class folders** (torchvision's ``ImageFolder`` layout)::

      <root>/<class name>/<image>            any image format Pillow opens, any extension case
      <root>/<class name>/<sub/folders>/<image>   images in nested folders belong to the class

  A class name is its folder name in Unicode NFC. Hidden entries (``.name``) are ignored, so the
  split files sg-train keeps in ``<root>/.sg-train/`` never become a class. Files that are not
  images, files outside any class folder and class folders without images are skipped and
  counted (:attr:`LabelledImages.skipped`).

* **a CSV** in open-metric-learning's format: ``path,label`` and optionally ``split``
  (``train``/``validation``), ``is_query``, ``is_gallery`` (0/1, on validation rows),
  ``x_1,y_1,x_2,y_2`` (a box in pixels, x2/y2 exclusive; ``x1,y1,x2,y2`` is read the same) and
  ``category`` (read, unused). Paths are relative to ``image_root`` (default: the CSV's folder)
  or absolute, ``/``-separated; one image file listed twice, however it is spelled (relative and
  absolute, ``./``, ``..``, through a symlink), is refused. Labels may be any text or integers;
  class names are their text, except that a label column written entirely as whole numbers with a
  ``.0`` (``12.0``: pandas writes integer ids so when the column had an empty cell) is read as
  integers (class ``12``).

Class names are sorted: integers (ASCII digits with an optional sign) first, in numeric order,
then the other names as text; the class index of an image is the position of its name, so the
same data always gives the same classes. Names that differ only in Unicode normal form or letter
case are refused (on many file systems they are the same folder, and in a CSV they are almost
always a typing slip), and so are spellings of one integer (``1``, ``01``, ``+1``, ``1.0``).

Held-out split (when the data does not give one): per class of ``n`` images, ``0`` are held out
for ``n = 1``, ``1`` for ``n`` of 2 or 3, and ``min(n // 2, max(2, round(n * fraction)))`` for
``n >= 4`` — at least two, so that a held-out image has another one of its class to find in a
leave-one-out benchmark. Which images is decided by a seeded hash of ``(seed, class name,
path)``: reproducible, independent of the order files are listed in, and adding photos to one
class leaves the other classes' splits as they were.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sg_train.errors import UserInputError
from sg_train.files import write_json
from sg_train.finetune import class_name_key
from sg_train.image_io import IMAGE_EXTENSIONS

from .image_dataset import pixel_box
from .revisited import read_image_sizes

__all__ = [
    "HELD_OUT_FORMAT",
    "LabelledDataError",
    "LabelledImages",
    "drop_unreadable",
    "held_out_count",
    "held_out_mask",
    "load_held_out_split",
    "read_class_folders",
    "read_labelled_csv",
]

HELD_OUT_FORMAT = "sg-train/held-out-split"
HELD_OUT_VERSION = 1
#: file extensions (lower case) of the formats Pillow can open
CSV_COLUMNS = ("path", "label", "split", "is_query", "is_gallery", "x_1", "y_1", "x_2", "y_2", "category")
_BOX_ALIASES = {"x1": "x_1", "y1": "y_1", "x2": "x_2", "y2": "y_2"}
_BOX = ("x_1", "y_1", "x_2", "y_2")
SPLITS = ("train", "validation")
_TRUE, _FALSE = {"1", "true", "yes"}, {"0", "false", "no"}
_INTEGER = re.compile(r"[+-]?[0-9]+")
_WHOLE_FLOAT = re.compile(r"([+-]?[0-9]+)\.0+")


class LabelledDataError(UserInputError):
    """Labelled images (class folders or CSV) that cannot be used as they are."""


@dataclass
class LabelledImages:
    """One row per image, in a fixed order (class, then path).

    Attributes:
        root: the folder ``paths`` are relative to.
        paths: image paths relative to ``root`` (``/``-separated; absolute where the CSV gave one).
        labels: int64 ``(N,)`` class index of each image, into ``class_names``.
        class_names: the class names, sorted (see the module docstring).
        split: ``(N,)`` bool, True for held-out (``validation``) rows, or None when the data does
            not say (then :func:`held_out_mask` decides).
        is_query, is_gallery: ``(N,)`` bool for the held-out rows' roles, or None (then every
            held-out image is both a query and a gallery item, leave-one-out).
        boxes: float64 ``(N, 4)`` ``x1, y1, x2, y2`` in pixels (NaN rows: the whole image), or None.
        source: the folder or CSV file read, for messages.
        skipped: ``{reason: [items]}`` of what was not used (non-image files, empty class folders,
            unreadable images).
        sizes: int64 ``(N, 2)`` (H, W) of every image from its header, once
            :func:`drop_unreadable` has read them (else None).
    """

    root: str
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    source: str
    split: np.ndarray | None = None
    is_query: np.ndarray | None = None
    is_gallery: np.ndarray | None = None
    boxes: np.ndarray | None = None
    skipped: dict[str, list[str]] = field(default_factory=dict)
    sizes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def path(self, i: int) -> str:
        """Absolute path of image ``i``."""
        return os.path.join(self.root, self.paths[i])

    def digest(self) -> str:
        """SHA-256 of the (path, class name) rows: which images, labelled how."""
        h = hashlib.sha256()
        for p, label in zip(self.paths, self.labels):
            h.update(f"{p}\t{self.class_names[label]}\n".encode())
        return h.hexdigest()


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _check_name_collisions(names: Sequence[str], source: str, what: str) -> None:
    """Refuse names that are the same after NFC normalisation and case folding, or that spell the
    same integer (``1``, ``01``, ``+1``, ``1.0``)."""
    seen: dict[str, str] = {}
    numbers: dict[int, str] = {}
    for name in names:
        key = class_name_key(name)
        if key in seen and seen[key] != name:
            raise LabelledDataError(
                f"{source}: {what} {seen[key]!r} and {name!r} are the same name after Unicode normalisation and "
                f"case folding; rename or merge one of them"
            )
        seen.setdefault(key, name)
        number = _integer_value(name)
        if number is not None and numbers.setdefault(number, name) != name:
            raise LabelledDataError(
                f"{source}: {what} {numbers[number]!r} and {name!r} are the same number {number}; merge them under one "
                f"spelling (e.g. '{number}') or rename one of them"
            )


def _integer_value(name: str) -> int | None:
    """The integer ``name`` spells (``1``, ``01``, ``+1``, ``1.0``), or None."""
    match = _WHOLE_FLOAT.fullmatch(name)
    digits = match.group(1) if match else name
    return int(digits) if _is_int(digits) else None


def _sort_key(name: str) -> tuple:
    """Integers first, by value, then text; ties broken by the name itself (a total order)."""
    return (0, int(name), name) if _is_int(name) else (1, 0, name)


def _is_int(text: str) -> bool:
    return _INTEGER.fullmatch(text) is not None


def _class_order(names: Sequence[str]) -> list[str]:
    """Sorted class names: integers first, in numeric order, then the others as text (see the module
    docstring); the same names give the same order whatever order they come in."""
    return sorted(set(names), key=_sort_key)


def _finish(rows: list[tuple[str, str]], root: str, source: str, **columns) -> LabelledImages:
    if not rows:
        raise LabelledDataError(f"{source}: no images found")
    class_names = _class_order([label for _, label in rows])
    if len(class_names) < 2:
        raise LabelledDataError(
            f"{source}: all {len(rows)} images are of the one class {class_names[0]!r}; classification training needs "
            "at least two classes (add a folder per class, or a label column with several values)"
        )
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[label] for _, label in rows], dtype=np.int64)
    order = np.lexsort((np.array([p for p, _ in rows], dtype=object).astype(str), labels))
    out = LabelledImages(root=root, paths=[rows[i][0] for i in order], labels=labels[order],
                         class_names=class_names, source=source)
    for key, value in columns.items():
        setattr(out, key, None if value is None else value[order])
    return out


def drop_unreadable(data: LabelledImages, progress: bool = False) -> LabelledImages:
    """``data`` without the images whose header cannot be read (not an image, cut short, gone), with
    every image's size in ``sizes`` and the dropped ones under ``skipped["unreadable images"]``
    (``"<path>: <reason>"``); a class left without images is dropped with them. Boxes are checked
    against the sizes. Raises :class:`LabelledDataError` for a box outside its image (naming the
    image) and when fewer than two classes are left.
    """
    paths = [data.path(i) for i in range(len(data))]
    sizes, errors = read_image_sizes(paths, progress=progress)
    keep = np.ones(len(data), dtype=bool)
    keep[list(errors)] = False
    for i in np.flatnonzero(keep) if data.boxes is not None else ():
        box = pixel_box(data.boxes[i])
        if box is not None and (box[2] > sizes[i, 1] or box[3] > sizes[i, 0]):
            raise LabelledDataError(f"{data.source}: box {data.boxes[i].tolist()} of {data.paths[i]!r} does not fit the "
                                    f"image ({sizes[i, 1]} x {sizes[i, 0]} W x H)")
    if keep.all():
        data.sizes = sizes
        return data
    rows = np.flatnonzero(keep)
    columns = {key: getattr(data, key) for key in ("split", "is_query", "is_gallery", "boxes")}
    out = _finish([(data.paths[i], data.class_names[data.labels[i]]) for i in rows], data.root, data.source,
                  **{key: None if value is None else value[rows] for key, value in columns.items()})
    out.skipped = {**data.skipped, "unreadable images": [f"{data.paths[i]}: {errors[i]}" for i in sorted(errors)]}
    lost = sorted(set(data.class_names) - set(out.class_names))
    if lost:
        out.skipped["classes without a readable image"] = lost
    order = {p: k for k, p in enumerate(data.paths)}
    out.sizes = sizes[[order[p] for p in out.paths]]
    return out


# ---------------------------------------------------------------------------- class folders
def read_class_folders(root: str | os.PathLike) -> LabelledImages:
    """Read ``<root>/<class>/<image>`` (see the module docstring).

    Raises FileNotFoundError for a missing ``root``, :class:`LabelledDataError` when no class
    folder holds an image, when there is a single class, or for class names that collide.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root!r} (expected <root>/<class name>/<image>)")
    rows: list[tuple[str, str]] = []
    skipped: dict[str, list[str]] = {}
    class_dirs = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            class_dirs.append(entry.name)
        else:
            skipped.setdefault("files outside a class folder", []).append(entry.name)
    _check_name_collisions(class_dirs, root, "class folders")
    for folder in class_dirs:
        name = _nfc(folder)
        found = 0
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.startswith("."):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, filename), root).replace(os.sep, "/")
                if os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS:
                    rows.append((rel, name))
                    found += 1
                else:
                    skipped.setdefault("not image files", []).append(rel)
        if not found:
            skipped.setdefault("class folders without images", []).append(folder)
    if not rows:
        raise LabelledDataError(f"{root}: no class folder holds an image (expected <root>/<class name>/<image>; "
                                f"extensions Pillow opens, e.g. .jpg .png .webp)")
    out = _finish(rows, root, root)
    out.skipped = skipped
    return out


# ---------------------------------------------------------------------------- CSV
def _flags(frame: pd.DataFrame, column: str, csv: str) -> np.ndarray:
    """A 0/1 column as bool; empty cells are False."""
    values = frame[column].str.strip().str.lower()
    bad = ~values.isin(_TRUE | _FALSE | {""})
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise LabelledDataError(f"{csv} line {row + 2}: {column}={frame[column].iloc[row]!r}; write 1 or 0")
    return values.isin(_TRUE).to_numpy()


def _boxes(frame: pd.DataFrame, csv: str) -> np.ndarray:
    cells = frame[list(_BOX)].apply(lambda col: col.str.strip())
    empty = (cells == "").to_numpy()
    partial = empty.any(axis=1) & ~empty.all(axis=1)
    if partial.any():
        row = int(np.flatnonzero(partial)[0])
        raise LabelledDataError(f"{csv} line {row + 2}: a box needs all of x_1, y_1, x_2, y_2 or none of them")
    numbers = cells.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(numbers) & ~empty
    if bad.any():
        row, col = (int(v[0]) for v in np.nonzero(bad))
        raise LabelledDataError(f"{csv} line {row + 2}: {_BOX[col]}={cells.iloc[row, col]!r} is not a number")
    given = ~empty.all(axis=1)
    x1, y1, x2, y2 = numbers.T
    wrong = given & ((x1 < 0) | (y1 < 0) | (x2 <= x1) | (y2 <= y1))
    if wrong.any():
        row = int(np.flatnonzero(wrong)[0])
        raise LabelledDataError(f"{csv} line {row + 2}: box {numbers[row].tolist()} is not x_1 < x_2, y_1 < y_2 "
                                "with non-negative pixel coordinates")
    return numbers


def _check_separator(csv: str) -> None:
    """Refuse a header line separated by ``;`` or tabs (a spreadsheet's regional "CSV", a TSV)."""
    with open(csv, encoding="utf-8-sig", errors="replace") as f:
        header = f.readline().rstrip("\r\n")
    if "," in header:
        return
    for separator, name in ((";", "';'"), ("\t", "tabs")):
        if separator in header:
            raise LabelledDataError(f"{csv}: the header {header!r} is separated by {name}, not by commas; save the "
                                    "file comma-separated (path,label,...)")


def _check_duplicates(csv: str, root: str, paths: Sequence[str]) -> None:
    """Refuse one image file listed twice, however spelled (relative/absolute, ``./``, symlinks)."""
    rows: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        rows.setdefault(_nfc(os.path.normcase(os.path.realpath(os.path.join(root, p)))), []).append(i)
    for file, lines in rows.items():
        if len(lines) > 1:
            shown = ", ".join(f"line {i + 2} {paths[i]!r}" for i in lines[:5])
            raise LabelledDataError(f"{csv}: the same image is listed more than once: {shown}"
                                    f"{' ...' if len(lines) > 5 else ''} "
                                    f"({'both' if len(lines) == 2 else f'all {len(lines)}'} are {file!r}); "
                                    "keep one row per image")


def _check_files(csv: str, root: str, paths: Sequence[str]) -> None:
    """Refuse paths that are folders or do not exist, listing the first five."""
    def listed(rows: list[tuple[int, str]]) -> str:
        shown = ", ".join(f"line {i + 2} {os.path.join(root, p)!r}" for i, p in rows[:5])
        return f"{shown}{' ...' if len(rows) > 5 else ''}"

    absent = [(i, p) for i, p in enumerate(paths) if not os.path.isfile(os.path.join(root, p))]
    folders = [(i, p) for i, p in absent if os.path.isdir(os.path.join(root, p))]
    if folders:
        raise LabelledDataError(f"{csv}: {len(folders)} of {len(paths)} paths are folders, not image files: "
                                f"{listed(folders)}; list each image file on its own row")
    if absent:
        slashed = next((p.replace("\\", "/") for _, p in absent
                        if "\\" in p and os.path.isfile(os.path.join(root, p.replace("\\", "/")))), None)
        hint = (f"these paths are written with \\, which is not a folder separator here: write them with / "
                f"(e.g. {slashed!r})" if slashed else
                f"relative paths start from data.image_root ({root!r}; default: the CSV's folder)")
        raise LabelledDataError(f"{csv}: {len(absent)} of {len(paths)} images do not exist: {listed(absent)}; {hint}")


def read_labelled_csv(csv: str | os.PathLike, image_root: str | os.PathLike | None = None) -> LabelledImages:
    """Read an OML-style CSV (see the module docstring).

    Raises FileNotFoundError for a missing CSV, :class:`LabelledDataError` naming the line or
    column for: a header separated by ``;`` or tabs instead of commas, missing ``path``/``label``
    columns, unknown columns, empty cells, one image file listed twice (however spelled), paths
    that are folders or do not exist (all of them are checked; paths written with ``\\`` get a
    hint), ``split`` values other than ``train``/``validation``, ``is_query`` without
    ``is_gallery`` (or the reverse), bad boxes, a single class, and labels that collide after
    normalisation or spell the same integer.
    """
    csv = os.fspath(csv)
    if not os.path.isfile(csv):
        raise FileNotFoundError(f"labelled CSV not found: {csv!r}")
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(csv))
    _check_separator(csv)
    try:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise LabelledDataError(f"{csv}: not a readable CSV ({exc})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    frame = frame.rename(columns=_BOX_ALIASES)
    unknown = [c for c in frame.columns if c not in CSV_COLUMNS]
    if unknown:
        raise LabelledDataError(f"{csv}: unknown columns {unknown}; the columns are path, label and optionally "
                                f"split, is_query, is_gallery, x_1, y_1, x_2, y_2, category")
    missing = [c for c in ("path", "label") if c not in frame.columns]
    if missing:
        raise LabelledDataError(f"{csv}: missing columns {missing} (has {list(frame.columns)}); "
                                "a labelled CSV needs at least path,label")
    if ("is_query" in frame.columns) != ("is_gallery" in frame.columns):
        raise LabelledDataError(f"{csv}: is_query and is_gallery go together; give both columns or neither")
    boxes_given = [c for c in _BOX if c in frame.columns]
    if boxes_given and len(boxes_given) != 4:
        raise LabelledDataError(f"{csv}: box columns {boxes_given} given; a box needs x_1, y_1, x_2, y_2")
    for column in ("path", "label"):
        empty = (frame[column].str.strip() == "").to_numpy()
        if empty.any():
            raise LabelledDataError(f"{csv} line {int(np.flatnonzero(empty)[0]) + 2}: empty {column}")
    paths = [p.strip() for p in frame["path"]]
    labels = [_nfc(v.strip()) for v in frame["label"]]
    _check_name_collisions(labels, csv, "labels")
    if all(_WHOLE_FLOAT.fullmatch(v) for v in labels):
        labels = [_WHOLE_FLOAT.fullmatch(v).group(1) for v in labels]
    _check_duplicates(csv, root, paths)
    _check_files(csv, root, paths)
    columns: dict[str, np.ndarray | None] = {"split": None, "is_query": None, "is_gallery": None, "boxes": None}
    if "split" in frame.columns:
        split = frame["split"].str.strip().str.lower()
        bad = ~split.isin(SPLITS)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise LabelledDataError(f"{csv} line {row + 2}: split={frame['split'].iloc[row]!r}; write train or "
                                    "validation")
        columns["split"] = (split == "validation").to_numpy()
    if "is_query" in frame.columns:
        if columns["split"] is None:
            raise LabelledDataError(f"{csv}: is_query/is_gallery describe validation rows; add a split column")
        columns["is_query"] = _flags(frame, "is_query", csv)
        columns["is_gallery"] = _flags(frame, "is_gallery", csv)
    if boxes_given:
        columns["boxes"] = _boxes(frame, csv)
    return _finish(list(zip(paths, labels)), root, csv, **columns)


# ---------------------------------------------------------------------------- held-out split
def held_out_count(n: int, fraction: float) -> int:
    """Images held out of a class of ``n`` (see the module docstring); ``fraction`` in (0, 1)."""
    if n <= 1:
        return 0
    if n <= 3:
        return 1
    return min(n // 2, max(2, int(round(n * fraction))))


def _rank_key(seed: int, class_name: str, path: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{class_name}\0{path}".encode()).digest()


def held_out_mask(images: LabelledImages, fraction: float, seed: int) -> np.ndarray:
    """``(N,)`` bool, True for the held-out images (module docstring rule)."""
    mask = np.zeros(len(images), dtype=bool)
    for c, name in enumerate(images.class_names):
        rows = np.flatnonzero(images.labels == c)
        keep = held_out_count(len(rows), fraction)
        if keep:
            ranked = sorted(rows, key=lambda r: _rank_key(seed, name, images.paths[r]))
            mask[ranked[:keep]] = True
    return mask


def default_split_file(images: LabelledImages, fraction: float, seed: int) -> str:
    """``<folder>/.sg-train/held_out_<digest12>_f<fraction>_seed<seed>.json``, beside the data."""
    folder = images.source if os.path.isdir(images.source) else os.path.dirname(os.path.abspath(images.source))
    return os.path.join(folder, ".sg-train", f"held_out_{images.digest()[:12]}_f{fraction:g}_seed{seed}.json")


def load_held_out_split(images: LabelledImages, fraction: float, seed: int, split_file: str | None = None
                        ) -> tuple[np.ndarray, str]:
    """The held-out mask, read from ``split_file`` when it exists, else drawn and written there.

    Default ``split_file``: :func:`default_split_file` (its name carries the data digest, so a
    changed data set gets a new file and never a stale split). Returns ``(mask, split_file)``.
    Raises :class:`LabelledDataError` for a file of other data, another fraction/seed, or one
    that cannot be written (naming ``data.split_file``).
    """
    path = split_file or default_split_file(images, fraction, seed)
    digest = images.digest()
    if os.path.isfile(path):
        try:
            stored = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LabelledDataError(f"split file {path}: unreadable ({exc}); delete it to draw the split again") from None
        if stored.get("format") != HELD_OUT_FORMAT or stored.get("data_digest") != digest:
            raise LabelledDataError(f"split file {path} was written for other data (images or labels differ); "
                                    "remove data.split_file (a new one is drawn) or point it at this data's file")
        if stored.get("fraction") != fraction or stored.get("seed") != seed:
            raise LabelledDataError(f"split file {path} holds fraction {stored.get('fraction')}, seed "
                                    f"{stored.get('seed')}; this run asks for {fraction}, {seed}")
        held = set(stored["held_out"])
        return np.array([p in held for p in images.paths], dtype=bool), path
    mask = held_out_mask(images, fraction, seed)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json(path, {"format": HELD_OUT_FORMAT, "version": HELD_OUT_VERSION, "data_digest": digest,
                          "fraction": fraction, "seed": seed, "source": images.source,
                          "held_out": [p for p, m in zip(images.paths, mask) if m]})
    except OSError as exc:
        raise LabelledDataError(f"cannot write the held-out split to {path} ({exc.strerror}); set data.split_file "
                                "to a writable path") from None
    return mask, path
