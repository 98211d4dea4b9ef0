"""Stop training at the first non-finite loss, before it reaches the weights."""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from sg_train.errors import UserInputError


class NonFiniteLossError(UserInputError, FloatingPointError):
    """The training loss became NaN or infinite.

    A :class:`~sg_train.errors.UserInputError`: the message names the step and the settings to change
    (learning rate, margin/scale, precision); a traceback would only point at this guard."""


class FiniteLossGuard(Callback):
    """Raise :class:`NonFiniteLossError` naming the step and batch when the loss is not finite.

    The check runs before ``backward``, so the optimizer never applies a NaN update, and checkpoints
    already on disk are left as they are (Lightning saves none on an exception). Under DDP the
    decision is shared so that every rank stops together instead of leaving the others hanging in
    a collective. It costs one device-to-host sync per step.
    """

    def __init__(self) -> None:
        self._batch_idx = -1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        value = loss.detach().float()
        finite = bool(torch.isfinite(value).all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        what = f"loss {value.item()}" if not finite else f"loss finite on rank {trainer.global_rank}, not on another rank"
        raise NonFiniteLossError(
            f"non-finite training loss ({what}) at global step {trainer.global_step}, epoch {trainer.current_epoch}, batch {self._batch_idx}; "
            "training stopped before the update, checkpoints already saved are intact. "
            "Lower the learning rate, check the margin/scale, or use bf16 instead of fp16."
        )
