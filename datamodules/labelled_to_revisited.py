"""Turn labelled photos (class folders or an OML-style CSV) into a Revisited-format benchmark, so
``evaluate.py`` (E/M/H mAP, SuperGlobal rerank, R1M distractors) can score a model on them.

::

    python -m datamodules.labelled_to_revisited --images "My Photos" --out data/mine --name myphotos
    python evaluate.py --checkpoint runs/finetune/checkpoints/last.ckpt --data-root data/mine --datasets myphotos

Which images: by default the held-out split that training uses (read and drawn by
:class:`~datamodules.labelled.LabelledImagesDataModule` itself, the same split file, so the
benchmark holds only images the model was not trained on). ``--checkpoint`` takes the split
options from a run's checkpoint and refuses photos other than the ones that run held out; without
it, ``--val-fraction``/``--seed``/``--split-file`` must be the run's (the split file used is
printed). ``--all`` takes every image. An image that cannot be decoded whole is left out, named. Every
chosen image is in the database; the queries are the ones marked ``is_query`` (all when the data
does not say). A query's positives ("easy") are the other database images of its class; its own
database entry is "junk" (ignored by the Revisited mAP), which makes the benchmark leave-one-out.
Query boxes are the CSV's boxes, else the whole image. Images are linked (``--copy``: copied)
as ``<out>/<name>/jpg/<imname>.jpg`` (``imname`` = ``000000``, ``000001``, ...; any format: the
reader decodes by content), and ``<out>/<name>/images.tsv`` maps each name to its file and class.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from sg_train.errors import user_error_line
from sg_train.files import atomic_write
from sg_train.weights_io import load_torch_file
from sg_train.synthetic.writers import write_revisited_gnd

from .labelled import LabelledImagesDataModule
from .labelled_index import LabelledDataError, LabelledImages

__all__ = ["write_revisited_benchmark"]


def write_revisited_benchmark(data: LabelledImages, rows: np.ndarray, out: str | os.PathLike, name: str, *,
                              copy: bool = False, overwrite: bool = False) -> Path:
    """Write the images ``rows`` of ``data`` as the Revisited data set ``<out>/<name>`` (module docstring).

    ``data`` must have been through :func:`~datamodules.labelled_index.drop_unreadable` (its
    image sizes are used; ValueError otherwise). Returns the ground-truth path. Raises
    :class:`LabelledDataError` when ``<out>/<name>`` exists (without ``overwrite``) or when no query
    has another image of its class.
    """
    if data.sizes is None:
        raise ValueError("data has no image sizes: pass it through drop_unreadable() first")
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise LabelledDataError(f"--name must be a plain name (letters, digits, _ or -), got {name!r}")
    folder = Path(out) / name
    if folder.exists():
        if not overwrite:
            raise LabelledDataError(f"{folder} exists; choose another --name or --out, or pass --overwrite to replace it")
        shutil.rmtree(folder)
    rows = np.asarray(rows, dtype=np.int64)
    labels = data.labels[rows]
    is_query = np.ones(len(rows), bool) if data.is_query is None else data.is_query[rows]
    paths = [os.path.abspath(data.path(i)) for i in rows]
    sizes = data.sizes[rows]
    imlist = [f"{k:06d}" for k in range(len(rows))]
    qimlist, gnd = [], []
    for k in np.flatnonzero(is_query):
        same = np.flatnonzero(labels == labels[k])
        if len(same) < 2:
            continue  # no other image of its class: no positive to find
        box = data.boxes[rows[k]] if data.boxes is not None and not np.isnan(data.boxes[rows[k]]).any() else None
        height, width = (int(v) for v in sizes[k])
        qimlist.append(imlist[k])
        gnd.append({"bbx": list(box) if box is not None else [0.0, 0.0, float(width), float(height)],
                    "easy": [int(j) for j in same if j != k], "hard": [], "junk": [int(k)]})
    if not gnd:
        raise LabelledDataError(f"{data.source}: no query has another image of its class among the {len(rows)} "
                                "images chosen; hold out more images or use --all")
    (folder / "jpg").mkdir(parents=True)
    for imname, path in zip(imlist, paths):
        target = folder / "jpg" / f"{imname}.jpg"
        shutil.copyfile(path, target) if copy else target.symlink_to(path)
    table = "".join(f"{imname}\t{data.paths[i]}\t{data.class_names[data.labels[i]]}\n" for imname, i in zip(imlist, rows))
    atomic_write(folder / "images.tsv", lambda fh: fh.write(("imname\tpath\tclass\n" + table).encode("utf-8")))
    return write_revisited_gnd(out, name, imlist, qimlist, gnd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m datamodules.labelled_to_revisited", description=" ".join(__doc__.split("\n\n")[0].split()))
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="folder of class folders: <DIR>/<class>/<image>")
    source.add_argument("--csv", metavar="FILE", help="OML-style CSV: path,label[,split,is_query,is_gallery,x_1,...]")
    p.add_argument("--image-root", metavar="DIR", help="folder the CSV's relative paths start from (default: its folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="Revisited root: writes <out>/<name>/")
    p.add_argument("--name", required=True, help="data set name (evaluate.py --datasets NAME)")
    p.add_argument("--all", action="store_true", help="every image, not only the held-out split")
    p.add_argument("--checkpoint", metavar="CKPT", help="a checkpoint of the run trained on these photos: its "
                   "held-out split (fraction, seed, split file), checked to be the photos that run held out")
    p.add_argument("--val-fraction", type=float, help="held-out fraction, as data.val_fraction (default 0.2)")
    p.add_argument("--seed", type=int, help="held-out seed, as data.seed (default 0)")
    p.add_argument("--split-file", metavar="FILE", help="the held-out split file, as data.split_file")
    p.add_argument("--copy", action="store_true", help="copy the images (default: symbolic links)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing <out>/<name>")
    a = p.parse_args(argv)
    try:
        split = {"val_fraction": a.val_fraction, "seed": a.seed, "split_file": a.split_file}
        state = None
        if a.checkpoint:
            given = [f"--{key.replace('_', '-')}" for key, value in split.items() if value is not None]
            if given:
                raise LabelledDataError(f"--checkpoint sets the held-out split; leave out {', '.join(given)}")
            split, state = _run_split(a.checkpoint)
        split = {"val_fraction": 0.2, "seed": 0, **{k: v for k, v in split.items() if v is not None}}
        # the photos and the held-out split exactly as training reads and draws them
        datamodule = LabelledImagesDataModule(images=a.images, csv=a.csv, image_root=a.image_root, **split)
        data = datamodule.data
        if state is not None:
            datamodule.check_class_mapping(state)  # other classes or other held-out photos than the run's
        rows = np.arange(len(data)) if a.all else np.flatnonzero(datamodule.held_out)
        rows = datamodule.decodable(rows, "the benchmark")
        gnd = write_revisited_benchmark(data, rows, a.out, a.name, copy=a.copy, overwrite=a.overwrite)
    except Exception as exc:
        line = user_error_line(exc)  # re-raises a bug with its traceback
        print(f"error: {line}", file=sys.stderr)
        return 2
    split_source = datamodule.split_file or "the data's split column"
    chosen = "every image" if a.all else f"the held-out photos of {split_source}"
    print(f"wrote {gnd} ({len(rows)} database images: {chosen}) and {gnd.parent / 'jpg'}")
    return 0


def _run_split(checkpoint: str) -> tuple[dict, dict]:
    """``({val_fraction, seed, split_file}, datamodule state)`` of a run on labelled photos."""
    saved = load_torch_file(checkpoint, what="--checkpoint", weights_only=False,
                            expected="a checkpoint of a train.py run on labelled photos")
    state = saved.get(LabelledImagesDataModule.__qualname__) if isinstance(saved, dict) else None
    options = saved.get("datamodule_hyper_parameters") if isinstance(saved, dict) else None
    if state is None or not options:
        raise LabelledDataError(f"--checkpoint {checkpoint} is not of a run on labelled photos (class folders or a "
                                "CSV, datamodules.labelled.LabelledImagesDataModule); give --val-fraction/--seed instead")
    return {key: options.get(key) for key in ("val_fraction", "seed", "split_file")}, state


if __name__ == "__main__":
    sys.exit(main())
