"""``python -m sg_train.synthetic --out data/synthetic [options]``: generate the synthetic data set."""
from __future__ import annotations

import argparse
import json
import sys

from .pipeline import OutputDirError, generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sg_train.synthetic",
                                description="Generate the synthetic landmarks data set (GLDv2 training set, "
                                            "Revisited-format benchmark, optional R1M-format distractors).")
    p.add_argument("--out", required=True, help="output directory (created; must be empty or a finished set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-landmarks", type=int, default=300)
    p.add_argument("--views-per-landmark", type=int, default=12)
    p.add_argument("--bench-landmarks", type=int, default=25, help="query landmarks in the benchmark")
    p.add_argument("--queries-per-landmark", type=int, default=2)
    p.add_argument("--bench-positives", type=int, default=24, help="database views per query landmark")
    p.add_argument("--bench-distractors", type=int, default=250)
    p.add_argument("--r1m-distractors", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128, help="long side of every image (px)")
    p.add_argument("--bench-name", default="rsynth")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the generator's own paths in a non-empty --out")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        s = generate(a.out, seed=a.seed, train_landmarks=a.train_landmarks,
                     views_per_landmark=a.views_per_landmark, bench_landmarks=a.bench_landmarks,
                     queries_per_landmark=a.queries_per_landmark, bench_positives=a.bench_positives,
                     bench_distractors=a.bench_distractors, r1m_distractors=a.r1m_distractors,
                     image_size=a.image_size, bench_name=a.bench_name, workers=a.workers,
                     overwrite=a.overwrite, progress=not a.no_progress)
    except (OutputDirError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if s["skipped"]:
        print(f"{a.out}: already complete with this configuration; nothing to do")
    else:
        print(f"wrote {s['counts']['images']} images to {a.out} in {s['seconds']:.1f} s "
              f"({s['workers']} workers)")
    print(json.dumps({"counts": s["counts"], "paths": s["paths"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
