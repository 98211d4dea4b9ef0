"""Callbacks for subprocess DDP tests: each rank writes what it saw, one JSON file per rank."""
from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class RecordLossStats(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = {k: float(v) for k, v in pl_module.loss_fn.live_stats().items()}
        self.rows.append({"step": trainer.global_step, "labels": batch["label"].tolist(), **stats})

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"world_size": trainer.world_size, "rows": self.rows}))


class RecordRetrievalMetrics(Callback):
    """Write the ``retrieval/...`` callback metrics each rank ends validation with."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("retrieval/")}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"world{trainer.world_size}_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(metrics))


class RecordLoggedMetrics(Callback):
    """Per rank, write what a run logged, as JSON ``world<W>_rank<r>.json``:

    - ``"metrics"``: the ``val/*`` and ``data/*`` entries of ``trainer.callback_metrics`` when the
      run ends (after the last validation and the last epoch end);
    - ``"val_indices"``: the dataset indices this rank validated (with the sampler's repeats);
    - ``"steps"``: per training step, this rank's batch size and loss, and the ``train/loss``
      the step logged (read at the next hook, as Lightning publishes step metrics after
      ``on_train_batch_end``).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.val_indices: list[int] = []
        self.steps: list[dict] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.val_indices += batch["index"].tolist()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._read_logged_loss(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({"batch_size": len(batch["index"]), "loss": float(outputs["loss"])})

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._read_logged_loss(trainer)

    def _read_logged_loss(self, trainer) -> None:
        if self.steps and "logged" not in self.steps[-1]:
            self.steps[-1]["logged"] = float(trainer.callback_metrics["train/loss"])

    def teardown(self, trainer, pl_module, stage) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "data/"))}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"world{trainer.world_size}_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"metrics": metrics, "val_indices": self.val_indices, "steps": self.steps}))
