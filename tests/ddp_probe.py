"""A callback for subprocess DDP tests: each rank writes what its loss saw, one JSON file per rank."""
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
