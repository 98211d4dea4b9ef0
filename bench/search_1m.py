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
import resource
import shutil
import tempfile
import time

import numpy as np
import torch
from _timing import GIB, PeakRSS, database_chunks, max_rss_bytes, query_descriptors, roxford_like, set_threads

from sg_train.retrieval import evaluate_descriptors, format_results_table


def write_database(path: str, n: int, dim: int, view, sync: bool = False) -> None:
    """The simulated database as raw fp16 rows, written chunk by chunk (never all in memory)."""
    with open(path, "wb") as fh:
        for rows in database_chunks(n, dim, view):
            fh.write(rows.half().numpy().tobytes())
        if sync:  # on disk, so that its pages can be evicted from the cache
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

    gnd, view = roxford_like(args.nq, args.n_bench)
    gnd["imlist"] = [""] * args.n  # the whole database, as load_gnd's imlist would list it
    Q = query_descriptors(args.nq, args.dim)
    tmp = tempfile.mkdtemp(prefix="sg_bench_1m_", dir=args.tmpdir)
    try:
        path = os.path.join(tmp, "db_fp16.bin")
        t0 = time.perf_counter()
        write_database(path, args.n, args.dim, view, sync=args.cold)
        size = os.path.getsize(path)
        print(f"wrote {args.n} x {args.dim} fp16 ({size / GIB:.2f} GiB) "
              f"in {time.perf_counter() - t0:.1f} s (not timed)")
        if args.cold:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        X = np.memmap(path, dtype=np.float16, mode="r", shape=(args.n, args.dim))

        with PeakRSS() as peak:
            cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            res = evaluate_descriptors(Q, X, gnd, rerank=True, M=400, K=9, beta=0.15, topk=1000)
            seconds, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        print(format_results_table({f"simulated R1M ({args.n} x {args.dim} fp16, {args.nq} queries)": res}))
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        print(f"search + rerank + exact mAP: {seconds:.1f} s on {torch.get_num_threads()} threads "
              f"({'cold' if args.cold else 'warm'} page cache; {cpu:.1f} s CPU time, "
              f"{os.getloadavg()[0]:.1f} load average); peak RSS sampled during it {peak.peak / GIB:.2f} GiB")
        del X
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"seconds={seconds:.1f} peak_gib={max_rss_bytes() / GIB:.2f}")


if __name__ == "__main__":
    main()
