"""Google Landmarks v2 index: CSV reading, min-images filter, contiguous labels, stratified split.

Formats (docs/design.md §5):

* ``train.csv``: columns ``id,url,landmark_id`` (one row per image; ``url`` is not read);
* ``train_clean.csv``: columns ``landmark_id,images`` (one row per landmark, space-separated ids);
* image ``<image_dir>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``.

Everything is vectorised (pandas' C parser straight into fixed-width byte strings, numpy
sorts): no per-row Python. Image ids are kept as a numpy ``S`` array (UTF-8 bytes), rows
sorted by id, so nothing depends on the CSV's row order.

Split: per class of ``n`` images, ``floor(n * val_fraction + u)`` go to validation with ``u`` a
per-class uniform draw (so the expected overall fraction is exactly ``val_fraction``), capped
at ``n - 1`` (every class keeps at least one training image; a class of one image stays in
train); which images is a seeded random choice. The validation ids are written once to a
JSON split file (atomically: temporary file + ``os.replace``) and reused; a file that does
not fit the CSV is refused, naming the file.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sg_train.errors import UserInputError
from sg_train.files import write_json

__all__ = [
    "SPLIT_FORMAT",
    "SPLIT_VERSION",
    "GLDv2CSVError",
    "GLDv2Rows",
    "GLDv2Split",
    "SplitFileError",
    "build_gldv2_split",
    "default_split_path",
    "filter_min_images",
    "gldv2_image_path",
    "read_gldv2_csv",
    "relabel",
    "stratified_split",
]

SPLIT_FORMAT = "sg-train/gldv2-split"
SPLIT_VERSION = 1
_INT_RE = r"\s*[+-]?\d+\s*"
_ID_WIDTH = 32  # first-try fixed width for ids (GLDv2's are 16); wider ids are re-read


class GLDv2CSVError(UserInputError):
    """A GLDv2 CSV file that does not have the expected format."""


class SplitFileError(UserInputError):
    """A split file that cannot be used with the current CSV."""


def gldv2_image_path(root: str, image_id: str) -> str:
    """``<root>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``."""
    return f"{root}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


@dataclass(frozen=True)
class GLDv2Rows:
    """One entry per image, sorted by image id: ids (``S`` array, UTF-8) and original landmark ids."""

    path: str
    format: str  # "train" (id,url,landmark_id) or "clean" (landmark_id,images)
    ids: np.ndarray
    landmark_ids: np.ndarray  # int64


# --------------------------------------------------------------------------- reading


_FORMATS = "'id,url,landmark_id' (train.csv) or 'landmark_id,images' (train_clean.csv)"


def _read_csv(path: str, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` as UTF-8 (a BOM is skipped); a file in another encoding raises GLDv2CSVError."""
    try:
        return pd.read_csv(path, encoding="utf-8-sig", **kwargs)
    except UnicodeDecodeError as e:
        raise GLDv2CSVError(
            f"{path}: not UTF-8 text (it holds the byte {e.object[e.start:e.start + 1]!r}); "
            "save the file as UTF-8 (GLDv2's own CSVs are)"
        ) from None


def _header(path: str) -> list[str]:
    try:
        cols = _read_csv(path, nrows=0).columns
    except FileNotFoundError:
        raise FileNotFoundError(f"GLDv2 CSV not found: {path}") from None
    except pd.errors.EmptyDataError:
        raise GLDv2CSVError(
            f"{path}: empty file or only blank lines; expected a header line {_FORMATS} followed by the rows "
            "(download the file again if it was cut short)"
        ) from None
    return [str(c) for c in cols]


def _no_rows_error(path: str, fmt: str) -> GLDv2CSVError:
    row = "one line per image: id,url,landmark_id" if fmt == "train" else "one line per landmark: landmark_id,images"
    return GLDv2CSVError(
        f"{path}: has a header line but no rows (expected {row}); the file is empty past its header: "
        "download it again or point csv at the full file"
    )


def _bad_row_error(path: str, values: pd.Series, what: str) -> GLDv2CSVError:
    """Error naming the first row whose ``values`` entry is not an integer."""
    ok = values.str.fullmatch(_INT_RE).fillna(False).to_numpy(dtype=bool)
    if ok.all():
        return GLDv2CSVError(f"{path}: {what} values do not fit a 64-bit integer")
    i = int(np.flatnonzero(~ok)[0])
    v = values.iloc[i]
    shown = "empty" if (not isinstance(v, str) or v.strip() == "") else repr(v)
    return GLDv2CSVError(
        f"{path}: row {i + 1} (line {i + 2}): {what} {shown} is not an integer ({int((~ok).sum())} such rows)"
    )


def _landmark_ids(path: str, col: pd.Series, colname: str) -> np.ndarray:
    if pd.api.types.is_integer_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        return col.to_numpy(dtype=np.int64)
    # slow path, only on bad input: re-read the column as text to name the row
    raw = _read_csv(path, usecols=[colname], dtype=str, keep_default_na=False).iloc[:, 0]
    raise _bad_row_error(path, raw, "landmark_id")


def _read_train_ids(path: str, id_col: str, lid_col: str) -> tuple[np.ndarray, pd.Series]:
    # Fixed-width bytes skip millions of Python str objects (4x faster on train.csv) but
    # truncate silently: an id as long as the width means "re-read wider".
    width = _ID_WIDTH
    while True:
        df = _read_csv(path, usecols=[id_col, lid_col], dtype={id_col: f"S{width}"})
        ids = df[id_col].to_numpy()
        lens = np.char.str_len(ids) if len(ids) else np.zeros(0, dtype=np.int64)
        if not len(ids) or lens.max() < width:
            return ids.astype(f"S{max(1, int(lens.max()) if len(ids) else 1)}"), df[lid_col]
        width *= 4


def _count_tokens(rows: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All whitespace-separated tokens of ``rows`` (``S`` array) and how many each row has, vectorised."""
    big = "\n".join(rows).encode()
    tokens = np.array(big.split(), dtype=np.bytes_) if big.strip() else np.zeros(0, dtype="S1")
    b = np.frombuffer(big, dtype=np.uint8)
    space = (b == 32) | (b == 9) | (b == 13) | (b == 10) | (b == 11) | (b == 12)
    start = ~space
    start[1:] &= space[:-1]
    row = np.searchsorted(np.flatnonzero(b == 10), np.flatnonzero(start), side="right")
    counts = np.bincount(row, minlength=len(rows)).astype(np.int64)
    return tokens, counts


def read_gldv2_csv(path: str | os.PathLike) -> GLDv2Rows:
    """Read ``train.csv`` or ``train_clean.csv`` (format told by columns, then by name) into rows sorted by id.

    UTF-8 text, with or without a BOM. Raises FileNotFoundError for a missing file and
    GLDv2CSVError, naming the file and the fix, for a file that is empty, holds only a header,
    is not UTF-8, lacks a column, or has a bad, empty, too short or repeated value (naming the row).
    """
    path = os.fspath(path)
    cols = _header(path)
    stripped = [c.strip() for c in cols]
    name = os.path.basename(path).lower()
    fmt = "clean" if ("images" in stripped or ("clean" in name and "id" not in stripped)) else "train"
    required = ("landmark_id", "images") if fmt == "clean" else ("id", "landmark_id")
    missing = [c for c in required if c not in stripped]
    if missing:
        other = (
            "train.csv format: id,url,landmark_id" if fmt == "clean" else "train_clean.csv format: landmark_id,images"
        )
        raise GLDv2CSVError(
            f"{path}: missing required column(s) {missing} "
            f"(read as the {'train_clean.csv' if fmt == 'clean' else 'train.csv'} format, which needs "
            f"{list(required)}; the {other}); columns present: {cols}"
        )
    colname = {c: cols[stripped.index(c)] for c in required}
    if fmt == "train":
        ids, lid_col = _read_train_ids(path, colname["id"], colname["landmark_id"])
        if not len(ids):
            raise _no_rows_error(path, fmt)
        lids = _landmark_ids(path, lid_col, colname["landmark_id"])
        row_of = None
        empty = np.char.str_len(ids) == 0 if len(ids) else np.zeros(0, dtype=bool)
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise GLDv2CSVError(f"{path}: row {i + 1} (line {i + 2}): empty image id ({int(empty.sum())} such rows)")
    else:
        df = _read_csv(path, usecols=[colname["landmark_id"], colname["images"]], dtype={colname["images"]: object})
        if not len(df):
            raise _no_rows_error(path, fmt)
        lids = _landmark_ids(path, df[colname["landmark_id"]], colname["landmark_id"])
        ids, counts = _count_tokens(df[colname["images"]].fillna("").astype(str).tolist())
        if not len(ids):
            raise GLDv2CSVError(
                f"{path}: its {len(df)} landmark row(s) list no image ids (column 'images' is empty); "
                "write the space-separated image ids of each landmark there"
            )
        lids = np.repeat(lids, counts)
        row_of = np.repeat(np.arange(len(df)), counts)
    if len(ids):
        short = np.char.str_len(ids) < 3
        if short.any():
            j = int(np.flatnonzero(short)[0])
            i = j if row_of is None else int(row_of[j])
            raise GLDv2CSVError(
                f"{path}: row {i + 1} (line {i + 2}): image id {_s(ids[j])!r} is too short "
                "(GLDv2 ids name their folders by their first three characters)"
            )
        order = np.argsort(ids, kind="stable")
        ids, lids = ids[order], lids[order]
        dup = np.flatnonzero(ids[1:] == ids[:-1])
        if len(dup):
            raise GLDv2CSVError(
                f"{path}: image id {_s(ids[dup[0]])!r} is listed more than once ({len(dup)} duplicates)"
            )
    return GLDv2Rows(path=path, format=fmt, ids=ids, landmark_ids=lids)


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


# --------------------------------------------------------------------------- filtering / labels


def filter_min_images(landmark_ids: np.ndarray, min_images: int) -> np.ndarray:
    """Boolean mask of rows whose landmark has at least ``min_images`` images."""
    if min_images < 1:
        raise ValueError(f"min_images_per_class must be >= 1, got {min_images}")
    _, inv, counts = np.unique(landmark_ids, return_inverse=True, return_counts=True)
    return counts[inv] >= min_images


def relabel(landmark_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous labels ``0..C-1`` in ascending order of original id; returns ``(labels, classes)``."""
    classes, inv = np.unique(landmark_ids, return_inverse=True)
    return inv.astype(np.int64).reshape(-1), classes.astype(np.int64)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean validation mask over rows (taken in the order given: pass them sorted by id)."""
    n = len(labels)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if n == 0 or val_fraction == 0:
        return np.zeros(n, dtype=bool)
    num_classes = int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]  # grouped by class, random within
    counts = np.bincount(labels, minlength=num_classes)
    starts = np.cumsum(counts) - counts
    lab_sorted = labels[order]
    rank = np.arange(n) - starts[lab_sorted]
    n_val = np.floor(counts * val_fraction + rng.random(num_classes)).astype(np.int64)
    n_val = np.clip(n_val, 0, np.maximum(counts - 1, 0))
    mask = np.zeros(n, dtype=bool)
    mask[order] = rank < n_val[lab_sorted]
    return mask


# --------------------------------------------------------------------------- split file


def default_split_path(data_root: str | os.PathLike, csv: str, min_images: int, val_fraction: float, seed: int) -> str:
    """``<data_root>/splits/<csv stem>_min<m>_val<f>_seed<s>.json``."""
    stem = Path(csv).stem
    return os.path.join(os.fspath(data_root), "splits", f"{stem}_min{min_images}_val{val_fraction:g}_seed{seed}.json")


def _write_split_file(path: str, obj: dict) -> None:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json(path, obj)
    except OSError as e:
        raise OSError(f"cannot write split file {path!r} ({e}); set split_file to a writable location") from e


def _read_split_file(path: str) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SplitFileError(f"split file {path!r} is not valid JSON ({e}); delete it to regenerate") from None
    if not isinstance(obj, dict) or obj.get("format") != SPLIT_FORMAT or not isinstance(obj.get("val_ids"), list):
        raise SplitFileError(f"split file {path!r} is not an sg-train GLDv2 split file (format {SPLIT_FORMAT!r})")
    if obj.get("version") != SPLIT_VERSION:
        raise SplitFileError(f"split file {path!r} has version {obj.get('version')!r}, expected {SPLIT_VERSION}")
    return obj


def _mask_from_split_file(path: str, obj: dict, ids: np.ndarray, labels: np.ndarray, csv_path: str) -> np.ndarray:
    """Validation mask from a split file; ``ids`` must be sorted."""
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    val = np.array([str(v).encode() for v in obj["val_ids"]], dtype=np.bytes_) if obj["val_ids"] else np.zeros(0, "S1")
    pos = np.searchsorted(ids, val)
    found = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == val)
    if not found.all():
        missing = val[~found]
        raise SplitFileError(
            f"split file {path!r} does not match {csv_path!r}: {len(missing)} of its {len(val)} validation ids "
            f"are not in the CSV (after the min-images filter), e.g. {[_s(x) for x in missing[:5]]}; "
            "delete the file or choose another split_file"
        )
    if obj.get("num_images") != len(ids) or obj.get("num_classes") != num_classes:
        raise SplitFileError(
            f"split file {path!r} does not match {csv_path!r}: it was made for {obj.get('num_images')} images "
            f"in {obj.get('num_classes')} classes, the CSV (after the min-images filter) gives {len(ids)} images "
            f"in {num_classes} classes; delete the file or choose another split_file"
        )
    mask = np.zeros(len(ids), dtype=bool)
    mask[pos] = True
    if int(mask.sum()) != len(val):
        raise SplitFileError(f"split file {path!r} lists a validation id more than once")
    train_counts = np.bincount(labels[~mask], minlength=num_classes)
    if (train_counts == 0).any():
        c = int(np.flatnonzero(train_counts == 0)[0])
        raise SplitFileError(f"split file {path!r} puts every image of contiguous class {c} in validation")
    return mask


# --------------------------------------------------------------------------- all together


@dataclass
class GLDv2Split:
    """The relabelled, split index that the datamodule serves."""

    csv_path: str
    split_file: str | None
    landmark_ids: np.ndarray  # (C,) original landmark id of each contiguous label
    train_ids: np.ndarray
    train_labels: np.ndarray
    val_ids: np.ndarray
    val_labels: np.ndarray
    class_counts: np.ndarray = field(init=False)  # (C,) training images per contiguous label

    def __post_init__(self):
        self.class_counts = np.bincount(self.train_labels, minlength=len(self.landmark_ids)).astype(np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.landmark_ids)


def build_gldv2_split(
    csv_path: str | os.PathLike,
    *,
    min_images_per_class: int = 2,
    val_fraction: float = 0.05,
    seed: int = 0,
    split_file: str | os.PathLike | None = None,
) -> GLDv2Split:
    """Read, filter, relabel and split; the split is read from ``split_file`` if it exists, else written there.

    ``split_file=None`` computes the split without writing it (the same for the same inputs).
    """
    csv_path = os.fspath(csv_path)
    if min_images_per_class < 1:
        raise ValueError(f"min_images_per_class must be >= 1, got {min_images_per_class}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    rows = read_gldv2_csv(csv_path)
    uniq, inv, counts = np.unique(rows.landmark_ids, return_inverse=True, return_counts=True)
    keep_class = counts >= min_images_per_class
    if not keep_class.any():
        largest = int(counts.max()) if len(counts) else 0
        raise GLDv2CSVError(
            f"{csv_path}: no landmark has at least min_images_per_class={min_images_per_class} images "
            f"({len(rows.ids)} images read; the largest class has {largest})"
        )
    inv = inv.reshape(-1)
    keep = keep_class[inv]
    new_label = np.cumsum(keep_class) - 1  # contiguous, ascending original id
    ids = rows.ids[keep]
    labels = new_label[inv[keep]].astype(np.int64)
    classes = uniq[keep_class].astype(np.int64)

    split_path = os.fspath(split_file) if split_file is not None and val_fraction > 0 else None
    if split_path is not None and os.path.exists(split_path):
        obj = _read_split_file(split_path)
        recorded = {k: obj.get(k) for k in ("min_images_per_class", "val_fraction", "seed")}
        wanted = {"min_images_per_class": min_images_per_class, "val_fraction": val_fraction, "seed": seed}
        if recorded != wanted:
            warnings.warn(
                f"split file {split_path!r} was made with {recorded}, now {wanted}: using the file", stacklevel=2
            )
        val_mask = _mask_from_split_file(split_path, obj, ids, labels, csv_path)
    else:
        val_mask = stratified_split(labels, val_fraction, seed)
        if split_path is not None:
            _write_split_file(
                split_path,
                {
                    "format": SPLIT_FORMAT,
                    "version": SPLIT_VERSION,
                    "csv": os.path.basename(csv_path),
                    "min_images_per_class": min_images_per_class,
                    "val_fraction": val_fraction,
                    "seed": seed,
                    "num_images": len(ids),
                    "num_classes": len(classes),
                    "num_val": int(val_mask.sum()),
                    "val_ids": [_s(x) for x in ids[val_mask]],  # sorted, as ids are
                },
            )
    return GLDv2Split(
        csv_path=csv_path,
        split_file=split_path,
        landmark_ids=classes,
        train_ids=ids[~val_mask],
        train_labels=labels[~val_mask],
        val_ids=ids[val_mask],
        val_labels=labels[val_mask],
    )
