"""Helpers shared by the retrieval benchmarks: best-of-N wall time, peak resident memory while a
function runs (sampled from /proc, so torch and numpy allocations and mapped pages all count),
and access to the slow reference implementations that live beside the tests."""
from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):  # the package, and tests/test_retrieval_reference.py
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

GIB = 1 << 30
_PAGE = os.sysconf("SC_PAGE_SIZE")


def set_threads(n: int) -> None:
    """Limit torch (and BLAS through it) to ``n`` threads, as the targets are stated for 2 cores."""
    import torch

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


def peak_extra(fn: Callable[[], Any]) -> int:
    """Peak RSS above the starting RSS while ``fn`` runs once, in bytes."""
    with PeakRSS() as p:
        fn()
    return p.extra


def side_by_side(name_ref: str, ref: Callable[[], Any], name_ours: str, ours: Callable[[], Any], *,
                 ref_repeats: int, our_repeats: int) -> tuple[float, float]:
    """Time and measure both in this run, print a small table, return (ref_s, ours_s)."""
    t_ref, _ = best_time(ref, repeats=ref_repeats, warmup=0)
    t_ours, _ = best_time(ours, repeats=our_repeats, warmup=1)
    m_ref, m_ours = peak_extra(ref), peak_extra(ours)
    print(f"{'':24s}{'best time':>12s}{'peak RSS above start':>24s}")
    print(f"{name_ref:24s}{t_ref:11.4f}s{m_ref / 2**20:20.1f} MiB")
    print(f"{name_ours:24s}{t_ours:11.4f}s{m_ours / 2**20:20.1f} MiB")
    print(f"process peak RSS (ru_maxrss): {max_rss_bytes() / GIB:.2f} GiB")
    return t_ref, t_ours
