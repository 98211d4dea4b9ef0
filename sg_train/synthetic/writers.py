"""Writers for the on-disk formats the real data sets use (docs/design.md §5).

- GLDv2: ``train.csv`` (``id,url,landmark_id``), ``train_clean.csv`` (``landmark_id,images``,
  ids space-separated), images at ``train/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``.
- Revisited Oxford/Paris: ``<name>/gnd_<name>.pkl`` = ``{"imlist", "qimlist", "gnd"}`` with
  names without extension and one ``{"bbx", "easy", "hard", "junk"}`` dict per query;
  images at ``<name>/jpg/<imname>.jpg``.
- R1M: ``revisitop1m/revisitop1m.txt`` (relative paths *with* extension, one a line); the
  revisitop code reads image ``i`` from ``revisitop1m/jpg/<line i>``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def hex_id(*parts) -> str:
    """A 16-hex-character id (like GLDv2's) derived from ``parts``: stable across runs."""
    key = ":".join(str(p) for p in parts).encode()
    return hashlib.blake2b(key, digest_size=8).hexdigest()


def gldv2_image_path(root: str | os.PathLike, image_id: str) -> Path:
    """``<root>/train/<id[0]>/<id[1]>/<id[2]>/<id>.jpg`` (the GLDv2 layout)."""
    return Path(root) / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=int(quality), optimize=False,
                                     progressive=False, subsampling=2)
    return buf.getvalue()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_gldv2_csvs(root: str | os.PathLike, rows: list[tuple[str, int]], clean: dict[int, list[str]]) -> None:
    """``rows``: (image id, landmark id) in file order; ``clean``: landmark id -> image ids."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "url", "landmark_id"])
        for image_id, landmark_id in rows:
            w.writerow([image_id, "", int(landmark_id)])
    with open(root / "train_clean.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["landmark_id", "images"])
        for landmark_id in sorted(clean):
            if clean[landmark_id]:
                w.writerow([int(landmark_id), " ".join(clean[landmark_id])])


def write_revisited_gnd(root: str | os.PathLike, name: str, imlist: list[str], qimlist: list[str],
                        gnd: list[dict]) -> Path:
    """Write ``<root>/<name>/gnd_<name>.pkl`` as a plain dict like ``gnd_roxford5k.pkl``."""
    n = len(imlist)
    clean_gnd = []
    for q, g in enumerate(gnd):
        entry = {
            "bbx": [float(v) for v in g["bbx"]],
            "easy": [int(i) for i in g["easy"]],
            "hard": [int(i) for i in g["hard"]],
            "junk": [int(i) for i in g["junk"]],
        }
        for key in ("easy", "hard", "junk"):
            if any(i < 0 or i >= n for i in entry[key]):
                raise ValueError(f"query {q}: {key} index out of range for imlist of {n}")
        clean_gnd.append(entry)
    cfg = {"imlist": [str(s) for s in imlist], "qimlist": [str(s) for s in qimlist], "gnd": clean_gnd}
    path = Path(root) / name / f"gnd_{name}.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, pickle.dumps(cfg, protocol=4))
    return path


def write_r1m_list(root: str | os.PathLike, relpaths: list[str]) -> Path:
    """Write ``<root>/revisitop1m/revisitop1m.txt`` (relative to ``revisitop1m/jpg/``)."""
    path = Path(root) / "revisitop1m" / "revisitop1m.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, "".join(p + "\n" for p in relpaths).encode())
    return path
