"""Count, report and record the images the data pipeline had to skip (unreadable or corrupt).

The datasets never raise on a bad file: the collate function drops the sample and lists
``"<path>\t<reason>"`` in ``batch["failed"]``. This callback gathers those lists over an epoch
(from every rank), logs the count, warns with the first few paths, and appends every entry to a
tab-separated file in the run folder, so one bad JPEG among millions costs one sample. A
training epoch that skips more than ``max_fraction`` of its samples stops the run: that many
bad files mean a broken copy of the data, not the odd corrupt image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from sg_train.errors import OptionError, UserInputError

__all__ = ["SkippedImagesReport", "TooManySkippedImagesError"]


class TooManySkippedImagesError(UserInputError, RuntimeError):
    """A training epoch skipped more than ``SkippedImagesReport.max_fraction`` of its samples: the
    data set's copy is broken (a :class:`~sg_train.errors.UserInputError`; a RuntimeError as before)."""


class SkippedImagesReport(Callback):
    """Per epoch: ``data/skipped_<stage>`` metric, a warning, and lines in ``<run folder>/<filename>``.

    Each report line is ``<epoch>\t<stage>\t<path>\t<reason>``; ``stage`` is ``train`` or ``val``.
    Entries are gathered over the DDP ranks and de-duplicated, so a file counts once per epoch and
    stage even when a ``DistributedSampler`` hands it out twice (it pads every rank to the same
    length by repeating samples): the metric equals the single-process one.

    Args:
        filename: the report file, written in ``trainer.default_root_dir`` (the run folder) by
            global rank 0.
        show: how many paths the warning names.
        max_fraction: in [0, 1]. At the end of every training epoch, ``skipped / (skipped + loaded)``
            over all ranks (``skipped``: distinct unreadable files; ``loaded``: samples that
            reached a batch) above this raises :class:`TooManySkippedImagesError` on every rank,
            after the report is written and before that epoch's checkpoint. 0 stops at the first
            skipped image, 1 never stops.

    Checkpoints hold the running totals (``self.totals``, per stage) and how many lines the
    report file had; resuming truncates the file back to those lines, so the epochs that are
    redone after an interruption are not listed twice. (A checkpoint written mid-epoch does not
    hold the entries that epoch has collected so far.)

    Raises :class:`~sg_train.errors.OptionError` (a ValueError) for a ``max_fraction`` outside [0, 1].
    """

    def __init__(self, filename: str = "skipped_images.tsv", show: int = 5, max_fraction: float = 0.05) -> None:
        if not 0.0 <= max_fraction <= 1.0:  # also refuses NaN
            raise OptionError(
                f"max_fraction must lie in [0, 1] (the largest fraction of a training epoch's samples that may be "
                f"unreadable), got {max_fraction}"
            )
        self.filename = filename
        self.show = show
        self.max_fraction = float(max_fraction)
        self.totals: dict[str, int] = {"train": 0, "val": 0}
        self._failed: dict[str, list[str]] = {"train": [], "val": []}
        self._loaded_train = 0
        self._report_lines = 0  # lines in the report file (kept by global rank 0, which writes it)
        self._restored_lines: int | None = None

    # ------------------------------------------------------------------ state (checkpoints)

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals), "report_lines": self._report_lines}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals = {stage: int(n) for stage, n in state_dict["totals"].items()}
        self._restored_lines = int(state_dict["report_lines"])

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        path = self.report_path(trainer)
        if trainer.is_global_zero and path.exists():  # a resumed run appends to its report
            with path.open("rb") as report:
                self._report_lines = sum(1 for _ in report)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores callback state after setup and before this hook.
        if self._restored_lines is not None and trainer.is_global_zero:
            self._truncate_report(self.report_path(trainer), self._restored_lines)
        self._restored_lines = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._loaded_train += self._collect("train", batch)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._collect("val", batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        skipped, loaded = self._report("train", trainer, pl_module, loaded=self._loaded_train)
        self._loaded_train = 0
        fraction = skipped / (skipped + loaded) if skipped else 0.0
        if fraction > self.max_fraction:  # the same on every rank: both counts are gathered
            raise TooManySkippedImagesError(
                f"epoch {trainer.current_epoch}: {fraction:.2%} of the training samples were unreadable "
                f"({skipped} skipped, {loaded} loaded), more than max_fraction={self.max_fraction:g}; they are listed "
                f"in {self.report_path(trainer)}: fix the listed files, or raise --skipped_images.max_fraction"
            )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report("val", trainer, pl_module, loaded=0)
        self._failed["val"].clear()

    # ------------------------------------------------------------------ work

    def report_path(self, trainer: pl.Trainer) -> Path:
        """``<trainer.default_root_dir>/<filename>``."""
        return Path(trainer.default_root_dir) / self.filename

    def _collect(self, stage: str, batch: Any) -> int:
        """Keep the batch's ``"failed"`` entries; return how many samples it loaded (``len(batch["index"])``)."""
        if not isinstance(batch, dict):  # not a batch of datamodules.collate: nothing to report
            return 0
        self._failed[stage].extend(batch.get("failed", ()))
        return len(batch.get("index", ()))

    def _report(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule, loaded: int) -> tuple[int, int]:
        """Gather this epoch's ``stage`` entries (de-duplicated) and this rank's ``loaded`` count over the
        ranks (one collective), log, warn and write the entries; return ``(skipped, loaded)``, both global."""
        entries, loaded = _gather(trainer, self._failed[stage], loaded)
        self._failed[stage] = []
        # The gathered count is the same on every rank: "max" returns it exactly and keeps it logged on
        # every rank (a monitor or callback on rank 1 sees it too), without Lightning's sync_dist warning.
        pl_module.log(f"data/skipped_{stage}", float(len(entries)), sync_dist=True, reduce_fx="max")
        if not entries:
            return 0, loaded
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
            self._report_lines += len(entries)
        return len(entries), loaded

    def _truncate_report(self, path: Path, lines: int) -> None:
        """Cut the report file back to its first ``lines`` lines (those of the checkpoint)."""
        kept, offset = 0, 0
        if path.exists():
            with path.open("rb+") as report:
                for line in report:
                    if kept == lines:
                        break
                    kept, offset = kept + 1, offset + len(line)
                report.truncate(offset)
        if kept < lines:
            rank_zero_warn(
                f"{path} has {kept} lines, the checkpoint was saved when it had {lines}: it was edited, moved "
                "or belongs to another run folder; appending to it as it is"
            )
        self._report_lines = kept


def _gather(trainer: pl.Trainer, entries: list[str], loaded: int) -> tuple[list[str], int]:
    """Every rank's ``entries`` (rank order, repeats removed, first kept) and the sum of their ``loaded``."""
    pairs = [(entries, loaded)]
    if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
        pairs = [None] * trainer.world_size
        dist.all_gather_object(pairs, (entries, loaded))
    distinct = dict.fromkeys(entry for rank_entries, _ in pairs for entry in rank_entries)
    return list(distinct), sum(rank_loaded for _, rank_loaded in pairs)
