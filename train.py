"""Train or fine-tune a landmark retrieval model.

    python train.py fit --config configs/demo.yaml [--trainer.max_epochs=3 ...]
    python train.py fit --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt   # resume
    python train.py validate --config configs/demo.yaml --ckpt_path <ckpt>
    wandb sweep configs/sweeps/train.yaml && wandb agent <sweep id>   # a W&B sweep: train.py once per trial

``trainer.default_root_dir`` is the run folder: every file of the run goes below it (see
:mod:`sg_train.run_folder`); a new ``fit`` refuses a folder that holds another run. A run that
``wandb agent`` starts is the agent's W&B run, in the folder ``<default_root_dir>/sweep-<sweep
id>/<run id>``. The class
count, the label map (stored in every checkpoint) and the per-class image counts for dynamic
margins come from the datamodule.

Bad input (a :class:`~sg_train.errors.UserInputError`, a missing or inaccessible path; see
:func:`sg_train.errors.is_user_error`) ends the command with one line on stderr,
``train.py: error: <message>``, and exit status 1; anything else is a bug and raises with its
traceback. Under DDP every process that fails prints its own line.
"""
from __future__ import annotations

import os
import secrets
import string
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI at import otherwise

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.fabric.utilities.rank_zero import rank_zero_only  # noqa: E402
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402

from callbacks.finite_loss import FiniteLossGuard  # noqa: E402
from callbacks.last_checkpoint import LastCheckpoint  # noqa: E402
from callbacks.log_progress import batch_log_progress_bar  # noqa: E402
from callbacks.run_config import SaveRunConfig  # noqa: E402
from callbacks.skipped_images import SkippedImagesReport  # noqa: E402
from datamodules.classification import ImageClassificationDataModule  # noqa: E402
from sg_train.errors import user_error_line  # noqa: E402
from sg_train.module import LandmarkRetrievalModule  # noqa: E402
from sg_train.run_folder import (  # noqa: E402
    CHECKPOINT_DIR,
    RunPlan,
    check_checkpoint_file,
    check_writable_dir,
    plan_run,
    record_start,
    resolve_checkpoint,
)
from sg_train.wandb_mode import FLUSH_INTERVAL_ENV, FLUSH_INTERVAL_S, resolve_wandb_mode, sweep_run  # noqa: E402


def _as_list(counts: torch.Tensor) -> list[int]:
    return [int(c) for c in counts.tolist()]


def _logger_entries(logger) -> list:
    """The logger entries of a parsed trainer config (a Namespace, a list of them, or a bool)."""
    entries = logger if isinstance(logger, list) else [logger]
    return [e for e in entries if hasattr(e, "class_path") and hasattr(e, "init_args")]


def _is_wandb(entry) -> bool:
    return entry.class_path.rsplit(".", 1)[-1] == WandbLogger.__name__


class TrainCLI(LightningCLI):
    """LightningCLI with run folders, a trustworthy ``last.ckpt`` and pre-flight checks.

    Only ``fit`` and ``validate`` are offered (``test``/``predict`` have no data here).
    """

    run_plan: RunPlan | None = None

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_counts", "model.class_counts", compute_fn=_as_list, apply_on="instantiate")
        parser.link_arguments("data.landmark_ids", "model.landmark_ids", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.add_lightning_class_args(SkippedImagesReport, "skipped_images")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            check_checkpoint_file(ckpt_path)  # before LightningCLI reads its hyper-parameters

    def before_instantiate_classes(self) -> None:
        """``fit``: decide the run folder (new or continued) and point the loggers at it.

        Under ``wandb agent`` (:func:`~sg_train.wandb_mode.sweep_run`) a new run is the agent's W&B
        run and its folder is ``<trainer.default_root_dir>/sweep-<sweep id>/<run id>``: every run of
        a sweep gets its own folder, found by the run id the W&B page shows.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = config.trainer.default_root_dir or os.getcwd()
        loggers = _logger_entries(config.trainer.logger)
        wandb = [e for e in loggers if _is_wandb(e)]
        if rank_zero_only.rank == 0:
            for entry in wandb:
                _prepare_wandb(entry.init_args)
        if self.subcommand not in (None, "fit"):  # None: built with run=False, to be fitted by the caller
            defaulted = [e for e in loggers if getattr(e.init_args, "save_dir", None) in (None, "", ".")]
            for entry in defaulted:  # validate: its logger files go to the run folder too, not the cwd
                entry.init_args.save_dir = str(run_dir)
            if defaulted and rank_zero_only.rank == 0:  # else W&B would write to /tmp, with only a warning
                check_writable_dir(run_dir, "run folder")
            return
        sweep = sweep_run()
        trial = None if sweep is None else os.path.join(f"sweep-{sweep[0]}", sweep[1])
        if trial is not None and not os.path.normpath(run_dir).endswith(os.sep + trial):
            run_dir = os.path.join(run_dir, trial)  # (a trial's own config.yaml already names its folder)
        ckpt_path = config.get("ckpt_path")  # absent when built with run=False
        if rank_zero_only.rank != 0:  # DDP workers: rank 0 decided and checked everything
            resume = resolve_checkpoint(run_dir, ckpt_path)
        else:
            new_id = (sweep[1] if sweep else wandb[0].init_args.id or _new_wandb_id()) if wandb else None
            self.run_plan = plan_run(run_dir, ckpt_path, new_wandb_id=new_id)
            resume = self.run_plan.resume_from
            run_dir = config.trainer.default_root_dir = str(self.run_plan.run_dir)
        if "ckpt_path" in config:
            config.ckpt_path = str(resume) if resume is not None else None
        if self.run_plan is None:
            return
        plan = self.run_plan
        for entry in loggers:
            args = entry.init_args
            if getattr(args, "save_dir", None) in (None, "", "."):
                args.save_dir = str(plan.run_dir)
            if _is_wandb(entry) and plan.wandb_id:
                # under a sweep wandb.init takes WANDB_RUN_ID (plan.wandb_id) and warns about any id it is given
                args.id, args.version = (None if sweep else plan.wandb_id), None
                args.resume = "allow"  # one W&B run for the whole run, across resumes

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        config = self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        bar = batch_log_progress_bar()  # plain lines under nohup/SLURM, Lightning's bar on a terminal
        if bar is not None and config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in listed):
            kwargs.setdefault("callbacks", [*listed, bar])
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand in (None, "fit"):
            self._prepare_run(trainer)
        return trainer

    def _prepare_run(self, trainer: pl.Trainer) -> None:
        """Put every checkpoint under ``<run>/checkpoints``, add ``last.ckpt``, check every folder written."""
        run_dir = os.path.abspath(trainer.default_root_dir)
        checkpoint_dir = os.path.join(run_dir, CHECKPOINT_DIR)
        checkpoints = [cb for cb in trainer.checkpoint_callbacks if not isinstance(cb, LastCheckpoint)]
        for cb in checkpoints:
            if cb.dirpath is None:
                cb.dirpath = checkpoint_dir
            cb.save_last = False  # LastCheckpoint is the one writer of last.ckpt
        if checkpoints:
            trainer.callbacks.append(LastCheckpoint(checkpoint_dir))
        if trainer.loggers and not any(isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks):
            # every parameter group's learning rate at every step: lr-<Optimizer>/<group> (backbone, head, ...)
            trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))
        if self.run_plan is None:  # a DDP worker
            return
        check_writable_dir(run_dir, "run folder")
        for cb in trainer.checkpoint_callbacks:
            check_writable_dir(cb.dirpath, "checkpoint folder")
        for logger in trainer.loggers:
            if logger.save_dir is not None:
                check_writable_dir(logger.save_dir, f"{type(logger).__name__} folder")
        trainer.callbacks.append(_RecordRunStart(self.run_plan))


class _RecordRunStart(Callback):
    """Write ``run.json`` once the pre-flight checks of every setup hook have passed (a run that
    stopped there leaves no trace that would make its folder look taken)."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            record_start(self.plan, "fit")
        where = f"continuing from {self.plan.resume_from}" if self.plan.resume_from else "new run"
        rank_zero_info(f"run folder: {self.plan.run_dir} ({where})")


def _prepare_wandb(init_args) -> None:
    """Before a WandbLogger is built: give it the mode :func:`sg_train.wandb_mode.resolve_wandb_mode`
    decides (an online run without API key or network goes offline, saying so in one line), have
    wandb-core write the run file every ``FLUSH_INTERVAL_S`` seconds instead of 15 (a killed run loses
    the rows of one interval: :data:`~sg_train.wandb_mode.FLUSH_INTERVAL_ENV`), and check the folder
    the configuration points W&B at.

    Raises :class:`~sg_train.run_folder.RunFolderError` when ``save_dir`` is a folder that cannot be
    written (W&B would write to /tmp instead, with only a warning). Without ``save_dir`` W&B writes
    to the run folder, which is checked too; ``WANDB_DIR`` is never used: the logger hands W&B its
    folder, and that wins over the environment.
    """
    mode, note = resolve_wandb_mode(bool(getattr(init_args, "offline", False)))
    if note:
        print(f"train.py: {note}", file=sys.stderr)
    init_args.offline = mode == "offline"
    if mode == "disabled":
        os.environ["WANDB_MODE"] = "disabled"
    os.environ.setdefault(FLUSH_INTERVAL_ENV, f"{FLUSH_INTERVAL_S:g}")
    save_dir = getattr(init_args, "save_dir", None)
    if save_dir not in (None, "", "."):
        check_writable_dir(save_dir, "W&B folder", fix=(
            "it is trainer.logger.init_args.save_dir: point it at a folder you can write, or drop it to keep "
            "the W&B files in the run folder"))


def _new_wandb_id() -> str:
    """8 random lower-case letters and digits, W&B's own id alphabet (its generator is in a private module)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def main(args: list[str] | None = None, run: bool = True) -> TrainCLI:
    """Parse ``args`` (default: the command line); with ``run=False`` only build the objects."""
    return TrainCLI(
        LandmarkRetrievalModule,
        ImageClassificationDataModule,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [FiniteLossGuard()]},
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the optimizer comes in through the module (model.optimizer)
        args=args,
        run=run,
    )


def run_command_line() -> int:
    """``main()`` on the command line: 0 when it finished, 1 after one line for bad input.

    Anything but bad input (:func:`sg_train.errors.is_user_error`) propagates with its traceback.
    Lightning re-raises a training failure as it was raised (after tearing down), so the original
    exception is judged here; a wrapper raised ``from`` bad input (e.g. a retrieval evaluation
    that failed on a damaged benchmark) counts as bad input and its own message is printed.
    """
    try:
        main()
    except Exception as exc:
        line = user_error_line(exc)  # re-raises a bug with its traceback
        print(f"train.py: error: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_command_line())
