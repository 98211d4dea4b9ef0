"""Count, report and record the images the data pipeline had to skip (unreadable or corrupt).

The datasets never raise on a bad file: the collate function drops the sample and lists
``"<path>\t<reason>"`` in ``batch["failed"]``. This callback gathers those lists over an epoch
(from every rank), logs the count, warns with the first few paths, and appends every entry to a
tab-separated file in the run's log directory, so one bad JPEG among millions costs one sample.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn


class SkippedImagesReport(Callback):
    """Per epoch: ``data/skipped_<stage>`` metric, a warning, and ``<log_dir>/<filename>`` lines.

    Args:
        filename: the report file, written in ``trainer.log_dir`` (or ``default_root_dir``).
        show: how many paths the warning names.
    """

    def __init__(self, filename: str = "skipped_images.tsv", show: int = 5) -> None:
        self.filename = filename
        self.show = show
        self._failed: dict[str, list[str]] = {"train": [], "val": []}
        self.totals: dict[str, int] = {"train": 0, "val": 0}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._collect("train", batch)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._collect("val", batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report("train", trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report("val", trainer, pl_module)
        self._failed["val"].clear()

    def _collect(self, stage: str, batch: Any) -> None:
        if isinstance(batch, dict):
            self._failed[stage].extend(batch.get("failed", ()))

    def _report(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        entries = self._failed[stage]
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[list[str]] = [[] for _ in range(trainer.world_size)]
            dist.all_gather_object(gathered, entries)
            entries = [entry for rank_entries in gathered for entry in rank_entries]
        self._failed[stage] = []
        pl_module.log(f"data/skipped_{stage}", float(len(entries)), rank_zero_only=True)
        if not entries:
            return
        self.totals[stage] += len(entries)
        shown = "; ".join(entries[: self.show])
        more = f" (and {len(entries) - self.show} more)" if len(entries) > self.show else ""
        rank_zero_warn(
            f"epoch {trainer.current_epoch}: skipped {len(entries)} unreadable {stage} image(s): {shown}{more}; "
            f"full list in {self.report_path(trainer)}"
        )
        if trainer.is_global_zero:
            path = self.report_path(trainer)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as report:
                report.writelines(f"{trainer.current_epoch}\t{stage}\t{entry}\n" for entry in entries)

    def report_path(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / self.filename
