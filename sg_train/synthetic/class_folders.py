"""A folder of "your own photos": new synthetic landmarks in class folders, as a user brings them.

::

    <out>/<landmark name>/IMG_0001.JPG       names with spaces and accents (NFC),
    <out>/<landmark name>/IMG_0002.png       extensions mixed: .jpg .JPG .png .jpeg

The landmarks are drawn from their own generator domain, so they are never among the training
landmarks or the benchmark of :func:`sg_train.synthetic.generate` (a model fine-tuned on them
learns classes it has not seen). Views follow the training views' easy/hard mix. Byte-identical
for a given seed and configuration. Command line:
``python -m sg_train.synthetic.class_folders --out "My Photos"``.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sg_train.progress import progress_bar

from .pipeline import OutputDirError
from .render import render_landmark, sample_landmark
from .views import category_ok, render_view, sample_view
from .writers import write_bytes

__all__ = ["LANDMARK_NAMES", "generate_class_folders"]

OWN_PHOTOS = 8  # generator domain (disjoint from the pipeline's 1-7)
MAX_TRIES = 40
#: class names, with spaces and accents as people name their folders
LANDMARK_NAMES = (
    "Église Saint-Étienne", "Café de Flore", "Sagrada Família", "Brandenburger Tor", "Mosteiro dos Jerónimos",
    "Hôtel de Ville", "Český Krumlov Castle", "Plaza Mayor", "Åre gamla kyrka", "São Bento station",
    "Kraków Barbakan", "Parc Güell", "Fontaine Médicis", "Łazienki Palace", "Zürich Grossmünster",
    "Real Alcázar", "Tower of London", "Öresund bridge", "Piazza San Marco", "Nyhavn 17",
)
EXTENSIONS = (".jpg", ".JPG", ".png", ".jpeg")


def _encode(rgb: np.ndarray, ext: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if ext == ".png":
        Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    else:
        Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def generate_class_folders(out_dir: str | Path, *, seed: int = 0, landmarks: int = 8, views: int = 10,
                           image_size: int = 128, progress: bool = True) -> dict[str, list[str]]:
    """Write ``landmarks`` class folders of ``views`` photos each under ``out_dir``.

    ``landmarks`` <= 20 takes the first names of :data:`LANDMARK_NAMES`; more repeat them with a
    number. Returns ``{class name: [file names]}``. Raises :class:`OutputDirError` when
    ``out_dir`` exists and is not empty (nothing is overwritten), ValueError for counts < 1.
    """
    if landmarks < 1 or views < 1:
        raise ValueError(f"landmarks and views must be >= 1, got {landmarks}, {views}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputDirError(f"{out} exists and is not an empty folder; choose a new --out")
    names = [LANDMARK_NAMES[i % len(LANDMARK_NAMES)] + (f" {i // len(LANDMARK_NAMES) + 1}" if i >= len(LANDMARK_NAMES)
                                                        else "") for i in range(landmarks)]
    written: dict[str, list[str]] = {}
    with progress_bar(total=landmarks * views, unit="img", desc="synthetic photos", enabled=progress) as bar:
        for j, name in enumerate(names):
            canvas = render_landmark(sample_landmark(np.random.default_rng([seed, OWN_PHOTOS, j])))
            files = []
            for k in range(views):
                rng = np.random.default_rng([seed, OWN_PHOTOS, j, k])
                category = "easy" if k % 3 != 2 else "hard"
                for _ in range(MAX_TRIES):
                    view = sample_view(rng, category, image_size)
                    img, _, stats = render_view(canvas, view, rng)
                    if category_ok(category, stats, view):
                        break
                ext = EXTENSIONS[(j + k) % len(EXTENSIONS)]
                filename = f"IMG_{k + 1:04d}{ext}"
                write_bytes(out / name / filename, _encode(img, ext.lower(), view.quality))
                files.append(filename)
                bar.update()
            written[name] = files
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sg_train.synthetic.class_folders", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="new or empty folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--landmarks", type=int, default=8, help="classes (folders)")
    p.add_argument("--views", type=int, default=10, help="photos per class")
    p.add_argument("--image-size", type=int, default=128, help="long side of every photo (px)")
    a = p.parse_args(argv)
    try:
        written = generate_class_folders(a.out, seed=a.seed, landmarks=a.landmarks, views=a.views,
                                         image_size=a.image_size)
    except (OutputDirError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {sum(len(v) for v in written.values())} photos of {len(written)} landmarks to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
