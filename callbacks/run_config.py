"""The run's whole configuration in its loggers, not only the module's hyper-parameters.

Lightning's :class:`~lightning.pytorch.cli.SaveConfigCallback` writes the resolved
``config.yaml`` into the run folder; this subclass also logs that configuration — model with its
optimizer, data, trainer with every callback (benchmarks, scales, protocol, rerank M/K/β), seed
— as each logger's hyper-parameters (W&B: the run's config, nested as in the YAML) and attaches
``config.yaml`` itself to a W&B run (``wandb.save``; an offline run keeps it for ``wandb sync``).
"""
from __future__ import annotations

import os

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

__all__ = ["SaveRunConfig"]


class SaveRunConfig(SaveConfigCallback):
    """``config.yaml`` in the run folder, and the same configuration in every logger (module docstring)."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
            if isinstance(logger, WandbLogger):
                path = os.path.join(trainer.log_dir, self.config_filename)
                if os.path.isfile(path):
                    logger.experiment.save(path, base_path=os.path.dirname(path), policy="now")
