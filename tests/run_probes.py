"""Callbacks the run tests load by class path into train.py subprocesses (``--trainer.callbacks+=run_probes.X``)."""
from __future__ import annotations

import copy
import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAt(Callback):
    """SIGKILL this process at the start of training batch ``batch`` of epoch ``epoch`` (a crash, no clean-up)."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class LogMetricPerEpoch(Callback):
    """Log ``name`` = ``values[epoch]`` at the end of each validation epoch (a monitor that can get worse)."""

    def __init__(self, name: str, values: list[float]):
        self.name, self.values = name, values

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            pl_module.log(self.name, float(self.values[trainer.current_epoch]))


class RecordStartState(Callback):
    """Keep the weights, optimizer state, step and learning rates as training starts (after a restore)."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.global_step = trainer.global_step
        self.lr = [g["lr"] for g in trainer.optimizers[0].param_groups]
