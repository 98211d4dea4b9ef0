"""Under DDP every logged metric is the single-process one: train.py on 1 and on 2 CPU processes.

Lightning's validation ``DistributedSampler`` pads the ranks to equal length by repeating the
first samples; with an odd held-out split on 2 processes, sample 0 is validated twice. The runs
are subprocesses (DDP inside pytest would re-launch pytest); ``ddp_probe.RecordLoggedMetrics``
writes what each rank logged.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from child_env import child_env
from test_training import write_config

from datamodules.gldv2 import GLDv2DataModule

ROOT = Path(__file__).resolve().parents[1]
VAL_FRACTION = 0.25  # 17 of the 72 synthetic images: odd


def held_out_copy(tmp_path: Path, synthetic_data: Path, corrupt: str) -> tuple[Path, int, str]:
    """A copy of the synthetic GLDv2 folder with one held-out image made unreadable: the first
    (``corrupt="first"``, the one the padding repeats) or the last. Returns the data folder, the
    split's size and the unreadable file."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_data / "gldv2", data / "gldv2")
    datamodule = GLDv2DataModule(str(data / "gldv2"), csv="train.csv", val_fraction=VAL_FRACTION, num_workers=0)
    datamodule.setup("validate")  # also writes the split file the runs will read
    size = len(datamodule.val_dataset)
    assert size % 2 == 1, f"the held-out split must be odd for the padding to repeat a sample, got {size}"
    bad = datamodule.val_dataset.path(0 if corrupt == "first" else size - 1)
    Path(bad).write_bytes(b"not a jpeg at all")
    return data, size, bad


def run_train(tmp_path: Path, *args: str) -> None:
    env = child_env()
    command = [sys.executable, str(ROOT / "train.py"), *args, "--trainer.logger=false",
               "--trainer.callbacks+=ddp_probe.RecordLoggedMetrics", f"--trainer.callbacks.out_dir={tmp_path / 'probe'}"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def probe(tmp_path: Path, world: int, rank: int) -> dict:
    return json.loads((tmp_path / "probe" / f"world{world}_rank{rank}.json").read_text())


def report_lines(run_dir: Path) -> list[list[str]]:
    return [line.split("\t") for line in (run_dir / "skipped_images.tsv").read_text().splitlines()]


def test_validate_on_two_processes_logs_exactly_the_single_process_metrics(tmp_path, synthetic_data):
    data, size, bad = held_out_copy(tmp_path, synthetic_data, corrupt="last")
    config = write_config(tmp_path, data)
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        run_train(tmp_path, "validate", "--config", str(config), f"--data.val_fraction={VAL_FRACTION}",
                  f"--trainer.devices={devices}", f"--trainer.strategy={strategy}",
                  f"--trainer.default_root_dir={tmp_path / f'run{devices}'}")
    single = probe(tmp_path, 1, 0)
    assert sorted(single["metrics"]) == ["data/skipped_val", "val/GAP", "val/acc"]
    assert 0 < single["metrics"]["val/acc"] < 1, "a repeated sample can only change an accuracy strictly inside (0, 1)"
    ranks = [probe(tmp_path, 2, rank) for rank in (0, 1)]
    # The padding at work: sample 0 validated twice, the unreadable last one by no rank.
    assert Counter(ranks[0]["val_indices"] + ranks[1]["val_indices"]) == Counter([*range(size - 1), 0])
    # Exact equality: accuracy and GAP are functions of the predicted classes and of the order
    # of the confidences, the count is an integer; the values go through the same float ops.
    for rank in ranks:
        assert rank["metrics"] == single["metrics"]
    assert single["metrics"]["data/skipped_val"] == 1.0
    for devices in (1, 2):
        assert [(stage, path) for _, stage, path, _ in report_lines(tmp_path / f"run{devices}")] == [("val", bad)]


def test_fit_on_two_processes_counts_a_repeated_unreadable_image_once_and_logs_the_global_batch_loss(tmp_path, synthetic_data):
    data, _, bad = held_out_copy(tmp_path, synthetic_data, corrupt="first")
    config = write_config(tmp_path, data)
    run_train(tmp_path, "fit", "--config", str(config), f"--data.val_fraction={VAL_FRACTION}", "--trainer.devices=2",
              "--trainer.strategy=ddp", "--trainer.limit_train_batches=2", "--trainer.num_sanity_val_steps=0")
    ranks = [probe(tmp_path, 2, rank) for rank in (0, 1)]
    assert 0 not in ranks[0]["val_indices"] + ranks[1]["val_indices"]  # sample 0 reached no batch...
    for rank in ranks:
        assert rank["metrics"]["data/skipped_val"] == 1.0  # ...though both ranks were handed it
    assert [(epoch, stage, path) for epoch, stage, path, _ in report_lines(tmp_path / "run")] == [("0", "val", bad)]
    # train/loss is the mean over the global batch, the same on both ranks: Σ loss_r·B_r / Σ B_r.
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 2
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        assert step0["loss"] != step1["loss"]  # each rank's own batch: a rank-0-only value would differ
        sizes = step0["batch_size"], step1["batch_size"]
        expected = (step0["loss"] * sizes[0] + step1["loss"] * sizes[1]) / sum(sizes)
        assert step0["logged"] == step1["logged"]
        assert abs(step0["logged"] - expected) <= 1e-6 * expected  # fp32 sums of a few numbers
