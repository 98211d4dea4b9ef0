"""Checkpoints as W&B model artifacts, with what they are in their metadata (when asked).

At the end of a successful ``fit`` the best checkpoint of every monitoring ``ModelCheckpoint``
(alias ``best``) and ``last.ckpt`` (alias ``last``) are logged to each ``WandbLogger``'s run as
artifacts of type ``model`` named ``model-<run id>``, with the metadata a reader needs to use one
without opening it: ``epoch``, ``global_step``, the monitor and its score (best), the retrieval
metrics logged at the end of the run (last), the evaluation ``protocol``, the model configuration
(``sg_train.model.EmbeddingModel.config``) and the class names. An offline run keeps them for
``wandb sync``. (Lightning's ``WandbLogger(log_model=True)`` records only the score and file name.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import wandb
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from callbacks.last_checkpoint import LastCheckpoint
from sg_train.weights_io import CHECKPOINT_RECORD_KEY

__all__ = ["CheckpointArtifacts"]


def _describe(path: str | Path) -> dict[str, Any]:
    """``epoch``, ``global_step`` and the sg-train record of the checkpoint at ``path`` (memory-mapped,
    so the weights are not read)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    record = checkpoint.get(CHECKPOINT_RECORD_KEY) or {}
    return {"epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step"),
            "protocol": record.get("protocol"), "model": record.get("model"), "class_names": record.get("class_names")}


class CheckpointArtifacts(Callback):
    """Log the best and last checkpoints as W&B model artifacts at the end of ``fit`` (module docstring).

    Args:
        best: log each monitoring ``ModelCheckpoint``'s best checkpoint.
        last: log ``last.ckpt``.
    """

    def __init__(self, best: bool = True, last: bool = True) -> None:
        self.best, self.last = bool(best), bool(last)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not trainer.is_global_zero or not loggers:
            return
        retrieval = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("retrieval/")}
        chosen: list[tuple[str, str, dict[str, Any]]] = []
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, LastCheckpoint):
                path = callback.best_model_path  # its one file, last.ckpt
                if self.last and path and Path(path).is_file():
                    chosen.append((path, "last", {"retrieval": retrieval}))
            elif isinstance(callback, ModelCheckpoint) and self.best and callback.monitor and callback.best_model_path:
                score = callback.best_model_score
                chosen.append((callback.best_model_path, "best", {
                    "monitor": callback.monitor, "mode": callback.mode,
                    "score": None if score is None else float(score)}))
        for logger in loggers:
            run = logger.experiment
            if run.settings.mode == "disabled":  # W&B would still stage a copy of every file
                continue
            for path, alias, extra in chosen:
                artifact = wandb.Artifact(f"model-{run.id}", type="model",
                                          metadata={**_describe(path), **extra, "file": Path(path).name})
                artifact.add_file(str(path), name="model.ckpt")
                run.log_artifact(artifact, aliases=[alias])
