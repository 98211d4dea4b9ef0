"""Multi-scale extraction throughput: ``extract_descriptors`` against the bare backbone.

Ours: the whole evaluation path on a Revisited-format set of synthetic-landmark JPEGs of mixed
sizes: RevisitedDataset (decode, normalise) -> size-bucketed batches -> ``model.extract`` at
scales [1/sqrt 2, 1, sqrt 2] (resize, backbone, R-GeM + GeM+, L2, FC, Scale-GeM, L2) ->
descriptors on the CPU. Backbone only: ``model.backbone.forward_features`` on the very same
batches, already decoded, normalised and resized to each scale outside the timing, nothing
else. Both run in this process, alternating, after a warm-up; medians are reported.
Last line: ``ratio=<our images/s / backbone images/s>``.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from datamodules.revisited import RevisitedDataset  # noqa: E402
from sg_train.extraction import extract_descriptors, plan_batches  # noqa: E402
from sg_train.model import EmbeddingModel, resize_for_scale  # noqa: E402
from sg_train.synthetic import generate  # noqa: E402

SCALES = (1 / math.sqrt(2), 1.0, math.sqrt(2))


def make_images(out: Path, n: int, size: int) -> RevisitedDataset:
    """``n`` database images (longest side ``size``, varied aspect ratios) in Revisited format."""
    landmarks = 4
    positives = max(2, n // (2 * landmarks))
    generate(out, train_landmarks=1, views_per_landmark=1, bench_landmarks=landmarks, bench_positives=positives,
             bench_distractors=max(0, n - landmarks * positives), image_size=size, progress=False)
    return out / "revisited"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--head", default="rgem+gemp+sgem")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=320, help="longest image side")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--data", type=Path, default=None, help="reuse/create the generated images here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tmp = tempfile.TemporaryDirectory(prefix="bench-extraction-") if args.data is None else None
    root = make_images(Path(tmp.name) if tmp else args.data, args.images, args.size)
    torch.manual_seed(0)
    model = EmbeddingModel(args.backbone, head=args.head, embedding_dim=args.dim).eval()
    ds = RevisitedDataset(root, "rsynth", "database", mean=model.mean, std=model.std, input_format=model.input_format)
    sizes = ds.image_sizes()
    plan = plan_batches(sizes, args.batch_size)
    # The backbone's input: the same batches, decoded, normalised and resized beforehand.
    batches = [[resize_for_scale(torch.stack([ds[i][0] for i in b]), s) for s in SCALES] for b in plan]
    n = len(ds)

    def ours() -> None:
        extract_descriptors(model, ds, scales=SCALES, batch_size=args.batch_size, num_workers=args.num_workers,
                            progress=False)

    def backbone() -> None:
        with torch.inference_mode():
            for per_scale in batches:
                for x in per_scale:
                    model.backbone.forward_features(x)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    timed(ours), timed(backbone)  # warm-up: allocator, kernel choices for every shape
    runs: dict[str, list[float]] = {"backbone": [], "ours": []}
    for r in range(args.repeats):
        order = (("ours", ours), ("backbone", backbone)) if r % 2 else (("backbone", backbone), ("ours", ours))
        for name, fn in order:
            runs[name].append(timed(fn))

    shapes = sorted({hw for hw in sizes}, key=lambda hw: -hw[0] * hw[1])
    print(f"{args.backbone} head={args.head} dim={args.dim}; {n} images, longest side {args.size}, "
          f"{len(shapes)} sizes {shapes}; {len(plan)} batches of <= {args.batch_size}; "
          f"scales {[round(s, 4) for s in SCALES]}; {args.threads} threads, {args.num_workers} workers")
    print(f"{'':44s}{'median s':>10s}{'images/s':>10s}   runs (s)")
    rate = {}
    for name, label in (("backbone", "backbone.forward_features (pre-resized)"),
                        ("ours", "extract_descriptors (read..descriptor)")):
        med = statistics.median(runs[name])
        rate[name] = n / med
        print(f"{label:44s}{med:10.2f}{rate[name]:10.2f}   {' '.join(f'{t:.2f}' for t in runs[name])}")
    if tmp:
        tmp.cleanup()
    print(f"ratio={rate['ours'] / rate['backbone']:.3f}")


if __name__ == "__main__":
    main()
