"""The run's whole configuration in its loggers, not only the module's hyper-parameters.

Lightning's :class:`~lightning.pytorch.cli.SaveConfigCallback` writes the resolved configuration
into the run folder; this subclass also logs that configuration — model with its optimizer,
data, trainer with every callback (benchmarks, scales, protocol, rerank M/K/β), seed — as each
logger's hyper-parameters (W&B: the run's config, nested as in the YAML) and attaches the file
itself to a W&B run (``wandb.save``; an offline run keeps it for ``wandb sync``).

``fit`` writes ``config.yaml``: the run's own configuration, which resuming reads back. Any other
command (``validate``) writes ``<command>_config.yaml`` beside it and leaves ``config.yaml`` as the
fit wrote it.
"""
from __future__ import annotations

import os

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

__all__ = ["SaveRunConfig"]


class SaveRunConfig(SaveConfigCallback):
    """The configuration file in the run folder, and the same configuration in every logger (module docstring)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        stage = getattr(stage, "value", stage)  # Lightning passes its TrainerFn (a str enum)
        if stage != "fit":
            self.config_filename = f"{stage}_config.yaml"
        # trainer.log_dir is a collective call under DDP (it broadcasts rank 0's folder): every rank
        # takes it here, as Lightning's setup does, because save_config runs on rank 0 alone
        self._log_dir = trainer.log_dir if not self.already_saved else None
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
            if isinstance(logger, WandbLogger) and self._log_dir is not None:
                path = os.path.join(self._log_dir, self.config_filename)
                if os.path.isfile(path):
                    logger.experiment.save(path, base_path=os.path.dirname(path), policy="now")
