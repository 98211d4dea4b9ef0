"""SkippedImagesReport: totals and report file across a kill and resume; stopping a run that skips too much."""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_training import write_config

import callbacks.skipped_images as skipped_images
import train
from callbacks.skipped_images import SkippedImagesReport, TooManySkippedImagesError


def corrupt_training_copy(tmp_path: Path, synthetic_data: Path, n_bad: int) -> tuple[Path, list[str]]:
    """A copy of the synthetic GLDv2 folder whose first ``n_bad`` images (by path) are not JPEGs."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_data / "gldv2", data / "gldv2")
    images = sorted((data / "gldv2" / "train").rglob("*.jpg"))
    for image in images[:n_bad]:
        image.write_bytes(b"not a jpeg at all")
    return data, [str(p) for p in images[:n_bad]]


def report_of(cli) -> SkippedImagesReport:
    return next(c for c in cli.trainer.callbacks if isinstance(c, SkippedImagesReport))


def test_resume_after_a_kill_continues_the_totals_and_lists_every_epoch_once(tmp_path, synthetic_data):
    """A run killed after epoch 1 was reported but before its checkpoint was written leaves the
    report with epochs 0 and 1 and the checkpoint of epoch 0. The first run here writes both
    checkpoints; resuming from epoch 0's reproduces that state, as a fresh process would meet it."""
    # 72 training images, batches of 8 (drop_last drops none): every epoch meets both bad files.
    data, bad = corrupt_training_copy(tmp_path, synthetic_data, n_bad=2)
    config = write_config(tmp_path, data)
    args = ["fit", "--config", str(config), "--data.val_fraction=0", "--data.image_size=32", "--trainer.logger=false",
            "--trainer.max_epochs=2", "--trainer.callbacks.init_args.save_top_k=-1",
            "--trainer.callbacks.init_args.every_n_epochs=1"]  # step9.ckpt after epoch 0, step18.ckpt after epoch 1
    train.main(args)
    report = tmp_path / "run" / "skipped_images.tsv"
    assert [int(line.split("\t")[0]) for line in report.read_text().splitlines()] == [0, 0, 1, 1]
    checkpoint = tmp_path / "run" / "checkpoints" / "step9.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"] == 0

    resumed = train.main([*args, f"--ckpt_path={checkpoint}"])
    assert resumed.trainer.current_epoch == 2  # epoch 1 was redone
    lines = [line.split("\t") for line in report.read_text().splitlines()]
    assert [int(epoch) for epoch, *_ in lines] == [0, 0, 1, 1]
    assert sorted((int(epoch), stage, path) for epoch, stage, path, _ in lines) == sorted(
        (epoch, "train", path) for epoch in range(2) for path in bad
    )
    assert report_of(resumed).totals == {"train": 4, "val": 0}  # 2 per epoch, the redone epoch 1 once


def fake_trainer(tmp_path: Path, rank: int = 0, world_size: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        default_root_dir=str(tmp_path), is_global_zero=rank == 0, global_rank=rank, world_size=world_size,
        current_epoch=0, sanity_checking=False,
    )


def test_resume_truncates_the_report_to_the_checkpoint_lines_and_warns_when_it_is_shorter(tmp_path):
    report = tmp_path / "skipped_images.tsv"
    report.write_text("0\ttrain\ta.jpg\tbad\n0\ttrain\tb.jpg\tbad\n1\ttrain\ta.jpg\tbad\n")
    callback = SkippedImagesReport()
    trainer = fake_trainer(tmp_path)
    callback.setup(trainer, None, "fit")
    callback.load_state_dict({"totals": {"train": 2, "val": 0}, "report_lines": 2})
    callback.on_train_start(trainer, None)
    assert report.read_text() == "0\ttrain\ta.jpg\tbad\n0\ttrain\tb.jpg\tbad\n"
    assert callback.state_dict() == {"totals": {"train": 2, "val": 0}, "report_lines": 2}

    callback.load_state_dict({"totals": {"train": 9, "val": 0}, "report_lines": 9})
    with pytest.warns(UserWarning, match=r"has 2 lines, the checkpoint was saved when it had 9"):
        callback.on_train_start(trainer, None)
    assert report.read_text().count("\n") == 2
    assert callback.state_dict()["report_lines"] == 2


@pytest.mark.parametrize("bad", [-0.01, 1.01, math.nan])
def test_max_fraction_must_lie_in_0_1(bad):
    with pytest.raises(ValueError, match=r"max_fraction must lie in \[0, 1\].*got"):
        SkippedImagesReport(max_fraction=bad)


def test_an_epoch_that_skips_too_much_stops_the_run_naming_fraction_counts_threshold_report_and_fix(tmp_path, synthetic_data):
    data, bad = corrupt_training_copy(tmp_path, synthetic_data, n_bad=5)  # 5 of 72 = 6.94 % > 5 %
    config = write_config(tmp_path, data)
    report = tmp_path / "run" / "skipped_images.tsv"
    message = (
        r"epoch 0: 6\.94% of the training samples were unreadable \(5 skipped, 67 loaded\), more than "
        rf"max_fraction=0\.05; they are listed in {re.escape(str(report))}: "
        r"fix the listed files, or raise --skipped_images\.max_fraction"
    )
    with pytest.raises(TooManySkippedImagesError, match=message):
        train.main(["fit", "--config", str(config), "--data.val_fraction=0", "--data.image_size=32", "--trainer.logger=false"])
    assert sorted(line.split("\t")[2] for line in report.read_text().splitlines()) == bad
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # stopped before the epoch's checkpoint


def test_the_stop_decision_is_taken_on_gathered_counts_so_every_rank_raises(tmp_path, monkeypatch):
    """In-process DDP emulation: rank 0 met one bad file (the sampler's padded repeat of one of rank 1's
    three). Alone, rank 0 would go on (1 of 40 = 2.5 % <= 3 %); both ranks decide on the gathered
    counts (3 distinct files, 77 loaded: 3.75 %), log the same value, and stop."""
    sent = [
        (["x.jpg\tbad"], 39),
        (["x.jpg\tbad", "y.jpg\tbad", "z.jpg\tbad"], 38),
    ]

    def all_gather_object(out, obj):
        assert obj in sent
        out[:] = sent

    monkeypatch.setattr(skipped_images.dist, "is_available", lambda: True)
    monkeypatch.setattr(skipped_images.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(skipped_images.dist, "all_gather_object", all_gather_object)
    for rank, (entries, loaded) in enumerate(sent):
        callback = SkippedImagesReport(max_fraction=0.03)
        logged = {}
        module = SimpleNamespace(log=lambda name, value, **kwargs: logged.update({name: value}))
        callback.on_train_batch_end(None, module, None, {"index": torch.arange(loaded), "failed": entries}, 0)
        with pytest.raises(TooManySkippedImagesError, match=r"3\.75% .*\(3 skipped, 77 loaded\)"):
            callback.on_train_epoch_end(fake_trainer(tmp_path, rank=rank, world_size=2), module)
        assert logged == {"data/skipped_train": 3.0}
        assert callback.totals == {"train": 3, "val": 0}
    assert (tmp_path / "skipped_images.tsv").read_text() == "".join(f"0\ttrain\t{e}\n" for e in sent[1][0])
