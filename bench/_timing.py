"""Helpers shared by the retrieval benchmarks: best-of-N wall time, peak resident memory while a
function runs (sampled from /proc, so torch and numpy allocations and mapped pages all count),
an ROxford-like synthetic benchmark, and access to the slow reference implementations that live
beside the tests (tests/test_retrieval_reference.py)."""
from __future__ import annotations

import os
import resource
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):  # the package, and tests/test_retrieval_reference.py
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

GIB = 1 << 30
_PAGE = os.sysconf("SC_PAGE_SIZE")


def set_threads(n: int) -> None:
    """Limit torch (and BLAS through it) to ``n`` threads, as the targets are stated for 2 cores."""
    torch.set_num_threads(n)


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def max_rss_bytes() -> int:
    """The process's peak resident set so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Context manager sampling this process's RSS every ``interval`` s; ``.peak`` and
    ``.extra`` (peak above the RSS at entry) in bytes."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = self.start = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def best_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> tuple[float, Any]:
    """Minimum wall time of ``repeats`` calls after ``warmup`` calls (robust to a busy machine)."""
    out = None
    for _ in range(warmup):
        out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def peak_memory(fn: Callable[[], Any]) -> tuple[int, int]:
    """While ``fn`` runs once: (peak RSS above the starting RSS, sampled; peak of Python/numpy
    allocations traced by tracemalloc, which sees short-lived arrays the sampler may miss), bytes."""
    with PeakRSS() as p:
        fn()
    tracemalloc.start()
    try:
        fn()
        traced = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return p.extra, traced


def side_by_side(name_ref: str, ref: Callable[[], Any], name_ours: str, ours: Callable[[], Any], *,
                 ref_repeats: int, our_repeats: int) -> tuple[float, float]:
    """Time and measure both in this run, print a small table, return (ref_s, ours_s).

    Ours is timed both before and after the reference (best of all), so that a load change on a
    shared machine during the long reference run does not decide the ratio by itself.
    """
    t_before, _ = best_time(ours, repeats=our_repeats, warmup=1)
    t_ref, _ = best_time(ref, repeats=ref_repeats, warmup=0)
    t_after, _ = best_time(ours, repeats=our_repeats, warmup=0)
    t_ours = min(t_before, t_after)
    print(f"{'':24s}{'best time':>12s}{'peak RSS above start':>24s}{'peak traced (numpy)':>22s}")
    for name, t, fn in ((name_ref, t_ref, ref), (name_ours, t_ours, ours)):
        rss, traced = peak_memory(fn)
        print(f"{name:24s}{t:11.4f}s{rss / 2**20:20.1f} MiB{traced / 2**20:18.1f} MiB")
    print(f"process peak RSS (ru_maxrss): {max_rss_bytes() / GIB:.2f} GiB")
    return t_ref, t_ours


# ------------------------------------------------------------ ROxford-like synthetic benchmark

LANDMARKS = 11  # ROxford's 70 queries show 11 landmarks
STRENGTH = {"easy": (0.15, 1.0), "hard": (0.02, 0.2), "junk": (0.02, 0.3)}  # share of the landmark direction


def roxford_like(nq: int = 70, n_bench: int = 4993, landmark_fraction: float = 0.25, seed: int = 0):
    """Ground truth shaped like ROxford: a quarter of the ``n_bench`` database rows show one of 11
    landmarks (45 % easy, 35 % hard, 20 % junk views), the rest nothing; query q shows landmark
    q % 11 and its easy/hard/junk lists are that landmark's views.

    Returns ``(gnd, view)`` with ``gnd`` in load_gnd's format and ``view`` = (landmark per row or
    -1, view strength per row) for ``unit_descriptors``.
    """
    rng = np.random.default_rng(seed)
    landmark = np.where(rng.random(n_bench) < landmark_fraction, rng.integers(0, LANDMARKS, n_bench), -1)
    category = rng.choice(np.array(list(STRENGTH)), n_bench, p=[0.45, 0.35, 0.2])
    lo = np.array([STRENGTH[c][0] for c in category])
    hi = np.array([STRENGTH[c][1] for c in category])
    strength = np.where(landmark >= 0, lo + (hi - lo) * rng.random(n_bench), 0.0)
    gnd = [{c: np.flatnonzero((landmark == qi % LANDMARKS) & (category == c)) for c in STRENGTH}
           for qi in range(nq)]
    for g in gnd:
        g["bbx"] = [0.0, 0.0, 100.0, 100.0]
    return ({"imlist": [f"db{i}" for i in range(n_bench)], "qimlist": [f"q{i}" for i in range(nq)], "gnd": gnd},
            (landmark, strength))


def landmark_directions(dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(LANDMARKS, dim, generator=g), dim=1)


def query_descriptors(nq: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Query q: its landmark's direction plus noise, unit norm."""
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.nn.functional.normalize(torch.randn(nq, dim, generator=g), dim=1)
    own = landmark_directions(dim, seed)[torch.arange(nq) % LANDMARKS]
    return torch.nn.functional.normalize(own + 0.6 * noise, dim=1)


def database_chunks(n: int, dim: int, view, seed: int = 0, chunk: int = 16384):
    """Yield unit-norm fp32 database rows in chunks: noise plus the row's share of its landmark
    direction; rows past the benchmark part (and non-landmark rows) are pure-noise distractors."""
    landmark, strength = view
    own = torch.zeros(n, dtype=torch.long)
    share = torch.zeros(n)
    own[: len(landmark)] = torch.from_numpy(np.maximum(landmark, 0))
    share[: len(strength)] = torch.from_numpy(strength).float()
    directions = landmark_directions(dim, seed)
    g = torch.Generator().manual_seed(seed + 2)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        x = torch.nn.functional.normalize(torch.randn(b - a, dim, generator=g), dim=1)
        x += share[a:b, None] * directions[own[a:b]]
        yield torch.nn.functional.normalize(x, dim=1)
