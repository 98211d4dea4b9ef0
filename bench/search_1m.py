"""R1M-scale retrieval on a simulated database: 1M x 2048 fp16 descriptors in a disk-backed
np.memmap, 70 queries; exact search (top-1000), SuperGlobal rerank (M=400) and the exact
Revisited mAP (positions beyond the top-k counted over the full similarity), with and without
reranking, through ``evaluate_descriptors``: the one call that evaluate.py and the validation
callback use.

Writing the simulated database is not timed; it is written in chunks (plain file writes, so it
never sits in memory) and deleted at the end. ``--cold`` evicts it from the page cache before
the timed part (a first read from disk); the default reads it warm, as after a previous run.
Last line: ``seconds=<timed part> peak_gib=<peak resident memory of the process>``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import _timing  # noqa: F401  (sets up sys.path)
import numpy as np
import torch
from _timing import GIB, PeakRSS, max_rss_bytes, set_threads

from sg_train.retrieval import evaluate_descriptors, format_results_table


LANDMARKS = 11  # ROxford's 70 queries show 11 landmarks
STRENGTH = {"easy": (0.15, 1.0), "hard": (0.02, 0.2), "junk": (0.02, 0.3)}  # ranges per view


def make_gnd(nq: int, n_bench: int, rng: np.random.Generator) -> tuple[dict, np.ndarray, np.ndarray]:
    """ROxford-like ground truth over the first ``n_bench`` rows: each row shows one of 11
    landmarks as an easy, hard or junk view; a query's lists are its landmark's rows.
    Returns (gnd, landmark per row, category per row)."""
    landmark = rng.integers(0, LANDMARKS, n_bench)
    category = rng.choice(np.array(["easy", "hard", "junk"]), n_bench, p=[0.45, 0.35, 0.2])
    gnd = []
    for qi in range(nq):
        mine = landmark == qi % LANDMARKS
        gnd.append({c: np.flatnonzero(mine & (category == c)) for c in STRENGTH})
    return {"qimlist": [f"q{i}" for i in range(nq)], "gnd": gnd}, landmark, category


def write_database(path: str, n: int, dim: int, centroids: torch.Tensor, landmark: np.ndarray,
                   category: np.ndarray, chunk: int = 16384) -> None:
    """Unit-norm fp16 rows: noise plus a random share of the row's landmark direction (easy
    strong, hard and junk weak, some beyond the top-1000 of 1M); the rows past the benchmark
    part are pure-noise distractors."""
    strength = torch.zeros(n)
    owner = torch.zeros(n, dtype=torch.long)
    lo, hi = (torch.tensor([STRENGTH[c][i] for c in category]) for i in (0, 1))
    strength[: len(category)] = lo + (hi - lo) * torch.rand(len(category), generator=torch.Generator().manual_seed(2))
    owner[: len(landmark)] = torch.from_numpy(landmark)
    gen = torch.Generator().manual_seed(1)
    with open(path, "wb") as fh:
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            x = torch.nn.functional.normalize(torch.randn(b - a, dim, generator=gen), dim=1)
            x += strength[a:b, None] * centroids[owner[a:b]]
            x = torch.nn.functional.normalize(x, dim=1).to(torch.float16)
            fh.write(x.numpy().tobytes())
        fh.flush()
        os.fsync(fh.fileno())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--nq", type=int, default=70)
    ap.add_argument("--n-bench", type=int, default=4993, help="rows carrying the ground truth (ROxford size)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="evict the file from the page cache first")
    ap.add_argument("--tmpdir", default=None)
    args = ap.parse_args()
    set_threads(args.threads)

    rng = np.random.default_rng(0)
    gnd, landmark, category = make_gnd(args.nq, args.n_bench, rng)
    gnd["imlist"] = [""] * args.n  # the database size, as load_gnd's imlist would give it
    unit = lambda a: torch.nn.functional.normalize(torch.from_numpy(a).float(), dim=1)  # noqa: E731
    centroids = unit(rng.standard_normal((LANDMARKS, args.dim)))
    noise = unit(rng.standard_normal((args.nq, args.dim)))
    Q = unit((centroids[np.arange(args.nq) % LANDMARKS] + 0.6 * noise).numpy())
    tmp = tempfile.mkdtemp(prefix="sg_bench_1m_", dir=args.tmpdir)
    try:
        path = os.path.join(tmp, "db_fp16.bin")
        t0 = time.perf_counter()
        write_database(path, args.n, args.dim, centroids, landmark, category)
        size = os.path.getsize(path)
        print(f"wrote {args.n} x {args.dim} fp16 ({size / GIB:.2f} GiB) in {time.perf_counter() - t0:.1f} s (not timed)")
        if args.cold:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        X = np.memmap(path, dtype=np.float16, mode="r", shape=(args.n, args.dim))

        with PeakRSS() as peak:
            t0 = time.perf_counter()
            res = evaluate_descriptors(Q, X, gnd, rerank=True, M=400, K=9, beta=0.15, topk=1000)
            seconds = time.perf_counter() - t0
        print(format_results_table({f"simulated R1M ({args.n} x {args.dim} fp16, {args.nq} queries)": res}))
        print(f"search + rerank + exact mAP: {seconds:.1f} s on {torch.get_num_threads()} threads "
              f"({'cold' if args.cold else 'warm'} page cache); peak RSS sampled during it "
              f"{peak.peak / GIB:.2f} GiB")
        del X
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"seconds={seconds:.1f} peak_gib={max_rss_bytes() / GIB:.2f}")


if __name__ == "__main__":
    main()
