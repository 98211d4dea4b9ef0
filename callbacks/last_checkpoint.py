"""``last.ckpt`` that always holds the run's latest state.

Since Lightning 2.6, ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt``
only when it also writes a new top-k checkpoint, so after an epoch whose metric did not improve
``last.ckpt`` is an older model: resuming from it repeats finished epochs, and evaluating it
scores the wrong weights. This callback does not depend on that rule: it is a
``ModelCheckpoint`` without a monitor that rewrites ``<dirpath>/last.ckpt`` at the end of
every training epoch that ran to its end (after validation and retrieval evaluation, so their
state is inside). ``train.py`` adds one to every run and turns ``save_last`` off on the other
checkpoint callbacks, so "last" has one writer.

An epoch cut short (``max_steps``, ``max_time``) is not saved as "last": Lightning runs the
epoch-end hooks for it and records the epoch as done, so a resume from that state would skip the
rest of the epoch. ``last.ckpt`` stays at the last complete epoch, and a resume redoes the cut
epoch from its start, drawing the same batches (:class:`~datamodules.sampler.SeededSampler`).
"""
from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["LAST_NAME", "LastCheckpoint"]

LAST_NAME = "last"


class LastCheckpoint(ModelCheckpoint):
    """Write ``<dirpath>/last.ckpt`` after every training epoch and at the end of fitting.

    Args:
        dirpath: the checkpoint folder (``None``: Lightning's default for the trainer, but
            ``train.py`` always passes ``<run folder>/checkpoints``).

    The file is overwritten in place through Lightning's atomic save (written elsewhere, then
    moved), so a kill during the write leaves the previous ``last.ckpt`` readable.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=LAST_NAME,
            monitor=None,
            save_top_k=1,
            every_n_epochs=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # not an epoch cut short
            super().on_train_epoch_end(trainer, pl_module)
