"""Progress bars for long work that also read well in a batch log.

On a terminal a tqdm bar redraws in place. Under nohup/SLURM (stderr not a terminal) every redraw
is appended to the log file, so the bar redraws at most every ``LOG_INTERVAL_S`` seconds there
and ends with a newline: the log still shows that the work moves on, without thousands of
carriage-return updates, and the next line is not glued to the bar.
"""
from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

__all__ = ["LOG_INTERVAL_S", "progress_bar"]

LOG_INTERVAL_S = 30.0


def progress_bar(*, total: int, desc: str, unit: str, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A ``tqdm`` bar (``enabled=False``: a silent one) that redraws at most every 30 s off a terminal."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs["leave"] = True  # end with a newline: the next log line starts a line of its own
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, **kwargs)
