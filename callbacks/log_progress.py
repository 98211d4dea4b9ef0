"""Training progress as plain, complete lines, for logs that are files (nohup, SLURM) rather than terminals.

Lightning's TQDM bar redraws one line with carriage returns; written to a file it shows nothing useful
until the run ends. :class:`LogProgress` is a drop-in replacement that prints whole lines instead::

    epoch 1/6  step 120/318 (global 438)  loss 3.712  acc 0.312  lr 1.9e-03  2.31 it/s  eta 1m26s
    epoch 1/6  val  acc 0.5125  GAP 0.431  in 12s
    epoch 1/6  done  318 steps in 2m31s (val 12s)  loss 3.101  acc 0.4122

Lines go to ``sys.stdout`` with ``print(..., flush=True)``, from global rank 0 only: stdout is where
Lightning's own bar and ``LightningModule.print`` write, the flush makes every line reach a redirected
file at once, and no logging configuration is needed (a ``logging`` logger without handlers would drop
INFO records, and the entry points configure none). :func:`batch_log_progress_bar` gives this bar
when stdout is not a terminal, and nothing (Lightning's own bar) when it is.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar

_VAL_PREFIXES = ("val/", "val_")


def format_value(value: Any) -> str:
    """A metric value, compactly: ``3.712``, ``0.3125``, ``1.9e-03``; ints, NaN, infinities and the rest via ``str``.

    Floats keep four significant digits; those below 0.01 or from 10 000 on in magnitude are written
    in exponent form with at most three (trailing zeros dropped), which suits learning rates.
    """
    if not isinstance(value, float) or not math.isfinite(value):
        return str(value)
    if value != 0 and not 0.01 <= abs(value) < 1e4:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"
    return f"{value:.4g}"


def format_duration(seconds: float) -> str:
    """A duration in seconds as ``45s``, ``1m26s`` or ``2h03m`` (rounded to whole seconds)."""
    total = round(seconds)
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


def batch_log_progress_bar() -> ProgressBar | None:
    """:class:`LogProgress` when stdout is not a terminal (a file, a pipe, SLURM), else None (keep
    Lightning's default terminal bar).

    stdout, not stderr, is tested because it is the stream both bars write to: with
    ``python train.py ... > run.log`` stderr is still a terminal, but a TQDM bar would fill the file.
    """
    return None if sys.stdout.isatty() else LogProgress()


class LogProgress(ProgressBar):
    """Print a progress line every ``every_n_steps`` training batches or ``every_seconds``, whichever first.

    Per line: the epoch (1-based, ``/max_epochs`` when bounded), the batch within the epoch (``/total``
    when finite), ``trainer.global_step`` (optimizer steps), the progress-bar metrics from
    :meth:`get_metrics` (``train/`` prefix and ``_step`` suffix dropped; validation metrics and
    previous epochs' ``_epoch`` values left out), the learning rate of the first parameter group of
    the first optimizer, the speed in batches per second (seconds per batch below one) averaged over
    the epoch so far without the time spent in validation, and the ETA of the epoch at that speed.

    After each validation of ``fit`` or ``validate`` (not the sanity check): the ``val/``/``val_``
    metrics and how long it took. At the end of each training epoch: the batch count, the wall time
    of the epoch (and the validation part of it), and the metrics, an ``_epoch`` value taking the
    place of its ``_step`` one (metrics logged on step only show their last value). Validation that
    runs at the end of an epoch comes before the epoch's ``on_train_epoch_end``, so its line precedes
    the ``done`` line.

    The time trigger is checked when a batch ends (a single batch longer than ``every_seconds`` gives
    one line) and counts from the last line written or from the epoch start. The step trigger fires
    at multiples of ``every_n_steps`` within the epoch, so lines stay aligned whatever the time
    trigger did in between. Nothing is printed on ranks other than global rank 0 (also after the
    tuner calls :meth:`enable`), and nothing while disabled.

    Args:
        every_n_steps: training batches between lines, a positive ``int``.
        every_seconds: at most this many seconds (of ``clock``) between lines during training, ``> 0``;
            ``math.inf`` leaves only the step trigger.
        clock: monotonic time in seconds, for the time trigger, the speed and the durations.

    Raises:
        TypeError: ``every_n_steps`` is not an ``int``, ``every_seconds`` not a real number, or
            ``clock`` not callable.
        ValueError: ``every_n_steps < 1``, or ``every_seconds`` not ``> 0`` (NaN included).
    """

    def __init__(self, every_n_steps: int = 50, every_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise TypeError(f"LogProgress: every_n_steps must be an int, got {every_n_steps!r}")
        if every_n_steps < 1:
            raise ValueError(f"LogProgress: every_n_steps must be >= 1, got {every_n_steps}")
        if isinstance(every_seconds, bool) or not isinstance(every_seconds, (int, float)):
            raise TypeError(f"LogProgress: every_seconds must be a number of seconds, got {every_seconds!r}")
        if not every_seconds > 0:
            raise ValueError(f"LogProgress: every_seconds must be > 0 (math.inf turns the time trigger off), got {every_seconds}")
        if not callable(clock):
            raise TypeError(f"LogProgress: clock must be a callable returning seconds, got {clock!r}")
        self.every_n_steps = every_n_steps
        self.every_seconds = float(every_seconds)
        self._clock = clock
        self._enabled = True
        self._epoch_start = 0.0
        self._epoch_total: int | float = 0  # read once: Lightning's total shrinks with global_step under max_steps
        self._epoch_batches = 0  # batches seen this epoch by this run (a resumed epoch starts mid-way)
        self._epoch_val_seconds = 0.0
        self._epoch_validated = False
        self._val_start = 0.0
        self._last_line = 0.0

    @property
    def is_enabled(self) -> bool:
        """Whether lines are printed: enabled and, once attached to a trainer, on global rank 0."""
        return self._enabled and (self._trainer is None or self._trainer.is_global_zero)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        """Lightning's progress-bar metrics without the logger version ``v_num``, which never changes in a run."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last_line = self._clock()
        self._epoch_total = self.total_train_batches
        self._epoch_batches = 0
        self._epoch_val_seconds = 0.0
        self._epoch_validated = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._epoch_batches += 1
        step = batch_idx + 1
        total = self._epoch_total
        now = self._clock()
        # Every rank takes the same decision and reads the metrics (reading them may synchronise
        # torchmetrics states across ranks: rank 0 alone would wait forever); only rank 0 prints.
        # The clock differs between processes, so under DDP only the step trigger counts.
        timed = trainer.world_size == 1 and now - self._last_line >= self.every_seconds
        if not (step % self.every_n_steps == 0 or timed) or step == total:  # the last batch: the "done" line
            return
        metrics = _train_metrics(self.get_metrics(trainer, pl_module), epoch_end=False)
        if not self.is_enabled:
            return
        fields = [self._epoch_label(trainer), f"step {step}{_of(total)} (global {trainer.global_step})"]
        if "lr" not in metrics and trainer.optimizers:
            metrics["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        fields += [f"{name} {format_value(value)}" for name, value in metrics.items()]
        seconds = now - self._epoch_start - self._epoch_val_seconds
        if seconds > 0:
            rate = self._epoch_batches / seconds
            fields.append(f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it")
            if math.isfinite(total):
                fields.append(f"eta {format_duration((total - step) / rate)}")
        self._write(fields, now)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = _train_metrics(self.get_metrics(trainer, pl_module), epoch_end=True)  # every rank (see above)
        if not self.is_enabled:
            return
        now = self._clock()
        took = f"{self._epoch_batches} steps in {format_duration(now - self._epoch_start)}"
        if self._epoch_validated:
            took += f" (val {format_duration(self._epoch_val_seconds)})"
        self._write([self._epoch_label(trainer), "done", took, *(f"{name} {format_value(value)}" for name, value in metrics.items())], now)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_start = self._clock()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        now = self._clock()
        took = now - self._val_start
        self._epoch_val_seconds += took
        self._epoch_validated = True
        logged = self.get_metrics(trainer, pl_module)  # every rank (see on_train_batch_end)
        if not self.is_enabled:
            return
        metrics = {
            key.split("/", 1)[1] if key.startswith("val/") else key: value
            for key, value in logged.items()
            if key.startswith(_VAL_PREFIXES)
        }
        fields = [self._epoch_label(trainer), "val"] if trainer.state.fn == "fit" else ["val"]
        fields += [f"{name} {format_value(value)}" for name, value in metrics.items()]
        self._write([*fields, f"in {format_duration(took)}"], now)

    def _epoch_label(self, trainer: pl.Trainer) -> str:
        bounded = trainer.max_epochs is not None and trainer.max_epochs > 0
        return f"epoch {trainer.current_epoch + 1}{_of(trainer.max_epochs) if bounded else ''}"

    def _write(self, fields: list[str], now: float) -> None:
        print("  ".join(fields), flush=True)
        self._last_line = now


def _of(total: int | float | None) -> str:
    return f"/{total}" if total is not None and math.isfinite(total) else ""


def _train_metrics(metrics: Mapping[str, Any], epoch_end: bool) -> dict[str, Any]:
    """Training metrics by short name: ``train/`` dropped; ``_step`` kept during the epoch, ``_epoch`` at its end."""
    shown: dict[str, Any] = {}
    for key, value in metrics.items():
        if key.startswith(_VAL_PREFIXES):
            continue
        name = key.removeprefix("train/")
        keep, drop = ("_epoch", "_step") if epoch_end else ("_step", "_epoch")
        if name.endswith(drop):
            continue
        shown[name.removesuffix(keep)] = value
    return shown
