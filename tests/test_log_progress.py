"""LogProgress: the plain progress lines of a tiny CPU fit, the time trigger on an injected clock, ranks, arguments."""
from __future__ import annotations

import io
import math
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.log_progress import LogProgress, batch_log_progress_bar, format_duration, format_value

LR = 0.05


class FakeClock:
    """A monotonic clock that only moves when told to, in seconds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TinyModule(pl.LightningModule):
    """A linear classifier that logs like sg_train's module and advances ``clock`` per batch (seconds)."""

    def __init__(self, clock: FakeClock, train_seconds: float, val_seconds: float) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.clock, self.train_seconds, self.val_seconds = clock, train_seconds, val_seconds
        self.losses: list[float] = []
        self.accs: list[float] = []
        self.val_hits: list[tuple[int, int]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.fc(x)
        loss = nn.functional.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.losses.append(loss.item())
        self.accs.append(acc.item())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", acc, prog_bar=True, on_step=True, on_epoch=True)
        self.clock.now += self.train_seconds
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        hits = int((self.fc(x).argmax(1) == y).sum())
        if not self.trainer.sanity_checking:
            self.val_hits.append((hits, len(y)))
        self.log("val/acc", hits / len(y), prog_bar=True, batch_size=len(y))
        self.clock.now += self.val_seconds

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def loaders(train_size: int = 16) -> tuple[DataLoader, DataLoader]:
    """8 training batches of 2 and 2 validation batches of 4, random features and labels."""
    train = TensorDataset(torch.randn(train_size, 4), torch.randint(0, 2, (train_size,)))
    val = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    return DataLoader(train, batch_size=2), DataLoader(val, batch_size=4)


def make_trainer(bar: LogProgress, max_epochs: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=[bar], logger=False,
        enable_checkpointing=False, enable_model_summary=False, **kwargs,
    )


def output_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_fit_prints_step_validation_and_epoch_lines(capsys):
    clock = FakeClock()
    model = TinyModule(clock, train_seconds=0.5, val_seconds=3.0)
    bar = LogProgress(every_n_steps=2, clock=clock)
    trainer = make_trainer(bar, max_epochs=2)
    assert trainer.progress_bar_callback is bar
    train_loader, val_loader = loaders()
    trainer.fit(model, train_loader, val_loader)

    expected = []
    for epoch in range(2):
        done = 8 * (epoch + 1)
        for step in (2, 4, 6):  # 8 is the last batch: the "done" line covers it
            i = epoch * 8 + step - 1
            expected.append(
                f"epoch {epoch + 1}/2  step {step}/8 (global {epoch * 8 + step})  loss {format_value(model.losses[i])}  "
                f"acc {format_value(model.accs[i])}  lr {format_value(LR)}  2.00 it/s  eta {(8 - step) // 2}s"
            )
        hits = model.val_hits[2 * epoch : 2 * epoch + 2]
        expected.append(f"epoch {epoch + 1}/2  val  acc {format_value(sum(h for h, _ in hits) / 8)}  in 6s")
        expected.append(
            f"epoch {epoch + 1}/2  done  8 steps in 10s (val 6s)  loss {format_value(model.losses[done - 1])}  "
            f"acc {format_value(sum(model.accs[done - 8 : done]) / 8)}"
        )
    assert output_lines(capsys) == expected  # the sanity check's validation printed nothing
    assert "lr 0.05" in expected[0] and "eta 3s" in expected[0]

    trainer.validate(model, val_loader, verbose=False)
    hits = model.val_hits[-2:]
    assert output_lines(capsys) == [f"val  acc {format_value(sum(h for h, _ in hits) / 8)}  in 6s"]


def test_time_trigger_fires_from_the_last_line_without_sleeping(capsys):
    clock = FakeClock()
    model = TinyModule(clock, train_seconds=25.0, val_seconds=0.0)
    trainer = make_trainer(LogProgress(every_n_steps=1000, every_seconds=60, clock=clock), max_epochs=1, limit_val_batches=0)
    trainer.fit(model, loaders()[0])
    lines = output_lines(capsys)
    # 25 s per batch: 75 s >= 60 at batch 3, again at batch 6 (75 s after the line at batch 3), 8 is the last.
    assert [line.split("  ")[1] for line in lines] == ["step 3/8 (global 3)", "step 6/8 (global 6)", "done"]
    assert lines[0].endswith("25.00 s/it  eta 2m05s") and lines[1].endswith("25.00 s/it  eta 50s")
    assert lines[2].startswith("epoch 1/1  done  8 steps in 3m20s  loss ")


def test_step_trigger_alone_when_time_trigger_is_off_and_epochs_unbounded(capsys):
    clock = FakeClock()
    model = TinyModule(clock, train_seconds=1e6, val_seconds=0.0)
    trainer = make_trainer(LogProgress(every_n_steps=3, every_seconds=math.inf, clock=clock), max_epochs=-1, max_steps=8, limit_val_batches=0)
    trainer.fit(model, loaders(train_size=32)[0])  # 16 batches per epoch, stopped by max_steps after 8
    lines = output_lines(capsys)
    assert [line.split("  ")[:2] for line in lines[:2]] == [["epoch 1", "step 3/8 (global 3)"], ["epoch 1", "step 6/8 (global 6)"]]
    assert len(lines) == 3 and lines[2].startswith("epoch 1  done  8 steps in ")


class _RankOne(SingleDeviceStrategy):
    """A single CPU process that reports itself as global rank 1, as a non-zero DDP rank would."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.global_rank = 1

    @property
    def is_global_zero(self) -> bool:
        return False


class _EnableOnFitStart(Callback):
    """Re-enable the bar after ``setup``, as the learning-rate finder does when it finishes, on every rank."""

    def __init__(self, bar: LogProgress) -> None:
        self.bar = bar

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert not self.bar.is_enabled  # ProgressBar.setup disabled it on this rank
        self.bar.enable()


def test_non_zero_rank_prints_nothing_even_after_enable(capsys):
    clock = FakeClock()
    bar = LogProgress(every_n_steps=1, clock=clock)
    trainer = make_trainer(bar, max_epochs=2, strategy=_RankOne())
    trainer.callbacks.append(_EnableOnFitStart(bar))
    trainer.fit(TinyModule(clock, train_seconds=1.0, val_seconds=1.0), *loaders())
    assert bar._enabled and trainer.global_step == 16
    assert capsys.readouterr().out == ""


def test_disable_silences_and_enable_restores(capsys):
    clock = FakeClock()
    bar = LogProgress(every_n_steps=4, clock=clock)
    bar.disable()
    make_trainer(bar, max_epochs=1, limit_val_batches=0).fit(TinyModule(clock, 1.0, 0.0), loaders()[0])
    assert capsys.readouterr().out == "" and not bar.is_enabled
    bar.enable()
    make_trainer(bar, max_epochs=1, limit_val_batches=0).fit(TinyModule(clock, 1.0, 0.0), loaders()[0])
    assert [line.split("  ")[1] for line in output_lines(capsys)] == ["step 4/8 (global 4)", "done"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 0}, ValueError, "every_n_steps must be >= 1"),
        ({"every_n_steps": 2.5}, TypeError, "every_n_steps must be an int"),
        ({"every_n_steps": True}, TypeError, "every_n_steps must be an int"),
        ({"every_seconds": 0}, ValueError, "every_seconds must be > 0"),
        ({"every_seconds": -1.0}, ValueError, "every_seconds must be > 0"),
        ({"every_seconds": math.nan}, ValueError, "every_seconds must be > 0"),
        ({"every_seconds": "60"}, TypeError, "every_seconds must be a number"),
        ({"clock": 3.0}, TypeError, "clock must be a callable"),
    ],
)
def test_arguments_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        LogProgress(**kwargs)


@pytest.mark.parametrize(
    ("value", "text"),
    [(3.7123, "3.712"), (0.3125, "0.3125"), (0.5, "0.5"), (0.0019, "1.9e-03"), (1e-4, "1e-04"), (12345.0, "1.23e+04"),
     (0.0, "0"), (-2.5, "-2.5"), (7, "7"), (math.nan, "nan"), ("a1b2", "a1b2")],
)
def test_format_value(value, text):
    assert format_value(value) == text


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (45, "45s"), (86, "1m26s"), (3599.6, "1h00m"), (7380, "2h03m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_batch_log_progress_bar_follows_whether_stdout_is_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert type(batch_log_progress_bar()) is LogProgress
    monkeypatch.setattr(sys, "stdout", _Terminal())
    assert batch_log_progress_bar() is None


def test_every_rank_reads_the_metrics_at_the_same_points(capsys):
    """Reading the metrics may synchronise them across DDP ranks: a rank that skipped the read while
    rank 0 waited in it hung a 2-process run whose stdout was a file."""
    reads = {}
    for name, strategy in (("rank0", "auto"), ("rank1", _RankOne())):
        clock = FakeClock()
        bar = LogProgress(every_n_steps=3, clock=clock)
        calls = []
        original = bar.get_metrics
        bar.get_metrics = lambda trainer, module, _orig=original, _calls=calls: _calls.append(trainer.global_step) or _orig(trainer, module)
        make_trainer(bar, max_epochs=2, strategy=strategy).fit(TinyModule(clock, train_seconds=100.0, val_seconds=1.0), *loaders())
        reads[name] = calls
    assert reads["rank0"] and reads["rank0"] == reads["rank1"]
    assert capsys.readouterr().out.count("\n") > 0
