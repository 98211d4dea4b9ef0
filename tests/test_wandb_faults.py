"""W&B under faults: a folder W&B cannot write stops the run before its first step, and a run killed
with SIGKILL leaves a readable run file that holds every row wandb-core had written."""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import wandb
from lightning.pytorch.callbacks import Callback

import train
import wandb_records
from child_env import child_env
from sg_train.run_folder import RunFolderError
from sg_train.wandb_mode import FLUSH_INTERVAL_ENV, FLUSH_INTERVAL_S
from test_runs import ROOT, demo_config
from test_wandb_records import history_record, payload_of_size, write_run_file
from wandb_records import BLOCK, HEADER


@pytest.mark.parametrize("command, option, message", [
    ("fit", "trainer.logger.init_args.save_dir", r"cannot write the W&B folder .*a_file/wandb \(Not a directory\); "
     r"it is trainer\.logger\.init_args\.save_dir: point it at a folder you can write"),
    ("validate", "trainer.logger.init_args.save_dir", r"cannot write the W&B folder .*a_file/wandb .*save_dir"),
    ("validate", "trainer.default_root_dir",
     r"cannot write the run folder .*a_file/wandb .*--trainer\.default_root_dir"),
])
def test_a_folder_wandb_cannot_write_stops_the_run_before_it_starts(tmp_path, synthetic_data, command, option, message):
    """The folder lies under a regular file, so it cannot be created, not even by root (the tests'
    user here, whom chmod does not stop). W&B itself would write to /tmp instead, with only a warning."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = demo_config(tmp_path, synthetic_data)
    with pytest.raises(RunFolderError, match=message):
        train.main([command, "--config", str(config), f"--{option}={blocker / 'wandb'}"])
    assert wandb.run is None and not (tmp_path / "run" / "run.json").exists()


def test_a_killed_runs_file_reads_up_to_where_it_ends(tmp_path):
    """What a killed wandb-core leaves: block 0 written as it filled, the rest of the record that
    spans into block 1 never written (or cut inside a chunk header or a chunk)."""
    path = tmp_path / "run.wandb"
    data = write_run_file(path, [history_record(0), payload_of_size(1, BLOCK)])
    assert len(data) > BLOCK + HEADER + 1
    for end in (BLOCK, BLOCK + 3, BLOCK + HEADER + 1):
        path.write_bytes(data[:end])
        with pytest.raises(ValueError):
            wandb_records.history(path)
        assert [row["step"] for row in wandb_records.history(path, killed=True)] == [0]
    path.write_bytes(data[:20] + bytes([data[20] ^ 1]) + data[21:BLOCK])  # damage before the end stays an error
    with pytest.raises(ValueError, match="bad checksum"):
        wandb_records.history(path, killed=True)


class ReportFlushInterval(Callback):
    """Write the flush interval the W&B run was given (``x_transaction_log_flush_interval``) to ``path``."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        Path(self.path).write_text(str(trainer.logger.experiment.settings.x_transaction_log_flush_interval))


def wandb_core_of(pid: int) -> int:
    """The wandb-core process serving process ``pid`` (W&B starts it with ``--pid <pid>``)."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:  # ended meanwhile
            continue
        if b"--pid" in args[:-1] and args[args.index(b"--pid") + 1] == str(pid).encode():
            return int(proc.name)
    raise AssertionError(f"no wandb-core process serves process {pid}")


def wait_for_exit(pid: int) -> None:
    """Block until process ``pid`` (not a child of ours) has ended."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [])  # a pidfd turns readable when its process ends
    finally:
        os.close(fd)


def rows_on_disk(run_dir: Path) -> list[dict]:
    """The history rows the live run's file holds now (wandb-core writes it while this reads)."""
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    try:
        return wandb_records.history(files[0], killed=True) if files else []
    except ValueError:  # read while a write was under way: seen in part
        return []


def training_steps(rows: list[dict]) -> list[int]:
    return [row["trainer/global_step"] for row in rows if "train/loss" in row]


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="waits for wandb-core with a pidfd (Linux)")
def test_sigkill_keeps_every_row_wandb_had_written(tmp_path, synthetic_data):
    """train.py logs every step; once its run file holds the rows of 60 steps, SIGKILL it. When
    wandb-core has exited, the file reads (as a killed run's) and still holds every row it held before
    the kill, the steps in order without a gap; wandb-core was told to write every second.

    WANDB_DIR points at a folder that cannot be created: train.py hands W&B the run folder, which wins.
    """
    config = demo_config(tmp_path, synthetic_data, max_epochs=1000, limit_val_batches=0)
    reported = tmp_path / "flush_interval.txt"
    (tmp_path / "a_file").write_text("not a folder")
    env = {k: v for k, v in child_env().items() if k != FLUSH_INTERVAL_ENV}  # train.py's own setting
    env["WANDB_DIR"] = str(tmp_path / "a_file" / "wandb")
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        child = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config), "--data.batch_size=2",
             "--trainer.callbacks+=test_wandb_faults.ReportFlushInterval", f"--trainer.callbacks.path={reported}"],
            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
    try:
        seen: list[dict] = []
        while len(training_steps(seen)) < 60:  # watch the run file grow
            assert child.poll() is None, stderr.read_text()[-3000:]
            time.sleep(0.2)
            seen = rows_on_disk(tmp_path / "run")
        core = wandb_core_of(child.pid)
        child.kill()
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    wait_for_exit(core)

    (path,) = (tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb")
    kept = wandb_records.history(path, killed=True)
    assert kept[: len(seen)] == seen
    steps = training_steps(kept)
    assert steps == list(range(len(steps))) and len(steps) >= 60
    assert "exit" not in {record.WhichOneof("record_type") for record in wandb_records.iter_records(path, killed=True)}
    assert float(reported.read_text()) == FLUSH_INTERVAL_S
