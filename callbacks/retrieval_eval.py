"""Retrieval validation during training: Revisited Oxford/Paris mAP, with and without SuperGlobal
reranking, every N epochs (DESIGN.md §4, §6).

Under DDP each rank extracts whole batches of a shared batch plan and the descriptors are
all-gathered, so the numbers equal a single-process run's to the last digit.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from datamodules.revisited import RevisitedDataset
from sg_train.extraction import DEFAULT_SCALES, extract_descriptors, gather_descriptors
from sg_train.files import atomic_write
from sg_train.retrieval import PROTOCOLS, evaluate_descriptors, format_results_table


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"mAP": {E, M, H}, "rerank_mAP": {...}}`` averaged over datasets, plus ``per_dataset``."""
    summary: dict[str, Any] = {}
    for key in ("mAP", "rerank_mAP"):
        if all(key in result for result in results.values()):
            summary[key] = {p: sum(r[key][p] for r in results.values()) / len(results) for p in PROTOCOLS}
    summary["per_dataset"] = {name: {k: r[k] for k in ("mAP", "rerank_mAP") if k in r} for name, r in results.items()}
    return summary


class RetrievalEvalCallback(Callback):
    """Log ``retrieval/<dataset>/mAP_{E,M,H}`` and ``retrieval/<dataset>/rerank_mAP_{E,M,H}``.

    Runs at the end of validation every ``every_n_epochs`` epochs (and in ``trainer.validate``);
    when the run has no validation loop it runs at the end of the training epoch instead. The
    metrics can be a ``ModelCheckpoint`` monitor (give it the same ``every_n_epochs``).

    Args:
        data_root: folder holding ``<name>/gnd_<name>.pkl`` and ``<name>/jpg/``.
        datasets: dataset names under ``data_root`` (``roxford5k``, ``rparis6k``, ``rsynth``, ...).
        scales: extraction scales (Scale-GeM over them when the head has ``sgem``).
        rerank: also rank with SuperGlobal reranking (``M``, ``K``, ``beta``).
        max_size: longest image side after resizing (``None``: images as they are).
        evaluate_before_training: also evaluate the untrained model when fitting starts.
        results_file: JSON written after each evaluation: ``{"untrained": ..., "trained": ...}``,
            each ``{"mAP": {E, M, H}, "rerank_mAP": {...}, "per_dataset": {...}, "epoch": e}``
            (top-level numbers averaged over datasets, in [0, 1]).
    """

    def __init__(
        self,
        data_root: str,
        datasets: list[str],
        every_n_epochs: int = 1,
        scales: Sequence[float] = DEFAULT_SCALES,
        rerank: bool = True,
        M: int = 400,
        K: int = 9,
        beta: float = 0.15,
        batch_size: int = 16,
        num_workers: int = 2,
        max_size: int | None = None,
        evaluate_before_training: bool = False,
        results_file: str | None = None,
        progress: bool = True,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if not datasets:
            raise ValueError("RetrievalEvalCallback needs at least one dataset name")
        self.data_root = Path(data_root)
        self.datasets = list(datasets)
        self.every_n_epochs = every_n_epochs
        self.scales = [float(s) for s in scales]
        self.rerank = rerank
        self.M, self.K, self.beta = M, K, beta
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_size = max_size
        self.evaluate_before_training = evaluate_before_training
        self.results_file = Path(results_file) if results_file else None
        self.progress = progress
        self.history: dict[str, dict[str, Any]] = {}
        self._evaluated_epoch: int | None = None
        self._datasets: dict[str, tuple[RevisitedDataset, RevisitedDataset]] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = pl_module.model
        preprocessing = {"mean": model.mean, "std": model.std, "input_format": model.input_format, "max_size": self.max_size}
        for name in self.datasets:  # read and check every ground truth now, not after an epoch
            self._datasets[name] = (
                RevisitedDataset(self.data_root, name, "query", **preprocessing),
                RevisitedDataset(self.data_root, name, "database", **preprocessing),
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evaluate_before_training and trainer.global_step == 0:
            results = self.evaluate(trainer, pl_module)
            if trainer.logger is not None:
                trainer.logger.log_metrics(self._metrics(results, prefix="retrieval_untrained"), step=0)
            self._record("untrained", results, trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and (trainer.state.fn != "fit" or self._due(trainer)):
            self._evaluate_and_log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation (when the run has any) has already run this epoch; this covers runs without it.
        if self._due(trainer) and self._evaluated_epoch != trainer.current_epoch:
            self._evaluate_and_log(trainer, pl_module)

    def _due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return epoch % self.every_n_epochs == 0 or last

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.history:
            blocks = {}
            for stage, summary in self.history.items():
                for name, result in summary["per_dataset"].items():
                    blocks[f"{name} ({stage}, epoch {summary['epoch']})"] = result
            rank_zero_info("Retrieval mAP (%):\n" + format_results_table(blocks))

    def _evaluate_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = self.evaluate(trainer, pl_module)
        for key, value in self._metrics(results, prefix="retrieval").items():
            pl_module.log(key, value, rank_zero_only=False, sync_dist=False)
        self._evaluated_epoch = trainer.current_epoch
        self._record("trained", results, trainer)

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, Any]]:
        """Extract (sharded over ranks), gather, search, rerank and score every dataset."""
        results = {}
        for name, (queries, database) in self._datasets.items():
            Q = self._extract(trainer, pl_module, queries, f"{name} queries")
            X = self._extract(trainer, pl_module, database, f"{name} database")
            results[name] = evaluate_descriptors(Q, X, queries.gnd, rerank=self.rerank, M=self.M, K=self.K, beta=self.beta)
        return results

    def _extract(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataset: RevisitedDataset, desc: str) -> torch.Tensor:
        indices, descriptors = extract_descriptors(
            pl_module.model,
            dataset,
            scales=self.scales,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=pl_module.device,
            shard=(trainer.global_rank, trainer.world_size),
            progress=self.progress and trainer.is_global_zero,
            desc=desc,
        )

        def all_gather(tensor: torch.Tensor) -> torch.Tensor:
            return pl_module.all_gather(tensor.to(pl_module.device)).cpu()

        return gather_descriptors(indices, descriptors, len(dataset), all_gather=all_gather)

    def _metrics(self, results: dict[str, dict[str, Any]], prefix: str) -> dict[str, float]:
        metrics = {}
        for name, result in results.items():
            for key in ("mAP", "rerank_mAP"):
                for protocol, value in result.get(key, {}).items():
                    metrics[f"{prefix}/{name}/{key}_{protocol}"] = float(value)
        return metrics

    def _record(self, stage: str, results: dict[str, dict[str, Any]], trainer: pl.Trainer) -> None:
        self.history[stage] = {**summarise(results), "epoch": trainer.current_epoch}
        if self.results_file is not None and trainer.is_global_zero:
            self.results_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.results_file, lambda fh: json.dump(self.history, fh, indent=2), mode="w")
