"""BackboneFreeze: a frozen backbone stays bit-identical (weights and batch-norm statistics), no
gradient reaches it, it trains from the unfreeze epoch on, also across resumes and on 2 DDP processes.

One 3-epoch fit (``frozen_run``, epochs 0 and 1 frozen) is shared by the single-process tests; the
resume tests continue from its per-epoch checkpoints. The DDP runs are train.py subprocesses (DDP
inside pytest would re-launch pytest); :class:`RecordBackbone` is their per-rank probe.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.nn.modules.batchnorm import _BatchNorm

from callbacks.backbone_freeze import FROZEN_METRIC, BackboneFreeze
from child_env import child_env
from datamodules.gldv2 import GLDv2DataModule
from sg_train.backbone import create_backbone
from sg_train.errors import OptionError
from sg_train.module import LandmarkRetrievalModule
from sg_train.run_folder import earlier_run_files
from test_training import write_config

ROOT = Path(__file__).resolve().parents[1]
UNFREEZE_AT = 2
EPOCHS = 3
BACKBONE_LR_MULT = 0.1


def split_state(module: pl.LightningModule) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of the backbone's state (weights and batch-norm buffers), the rest of the embedding
    model (pooling head, FC) and the loss's class weights."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    parts = {"backbone": {}, "head": {}, "class_weights": {}}
    for key, value in state.items():
        if key.startswith("model.backbone."):
            parts["backbone"][key] = value
        elif key.startswith("model."):
            parts["head"][key] = value
        elif key == "loss_fn.weight":
            parts["class_weights"][key] = value
    return parts


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The keys whose tensors are bit-identical in ``a`` and ``b`` (same key sets asserted)."""
    assert a.keys() == b.keys()
    return [k for k in a if torch.equal(a[k], b[k])]


class Recorder(Callback):
    """States at training start and after every epoch; per training batch, what the backbone was
    like when the head ran: whether its output carried an autograd graph, the batch-norm modes
    and the parameters' ``requires_grad``."""

    def __init__(self) -> None:
        self.states: dict[object, dict[str, dict[str, torch.Tensor]]] = {}
        self.batches: list[dict] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        backbone = pl_module.model.backbone

        def look(head, inputs) -> None:
            if trainer.training:  # not validation
                self.batches.append({
                    "epoch": trainer.current_epoch,
                    "graph": inputs[0].requires_grad,
                    "bn_training": {m.training for m in backbone.modules() if isinstance(m, _BatchNorm)},
                    "requires_grad": {p.requires_grad for p in backbone.parameters()},
                })

        pl_module.model.head.register_forward_pre_hook(look)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states["start"] = split_state(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states[trainer.current_epoch] = split_state(pl_module)

    def modes(self) -> dict[int, set[str]]:
        """Per epoch, how its training batches found the backbone: ``frozen`` (the head's input had
        no autograd graph, every batch-norm layer in eval mode, no parameter requiring grad),
        ``trained`` (all the opposite) or ``mixed``."""
        modes: dict[int, set[str]] = {}
        for b in self.batches:
            if (b["graph"], b["bn_training"], b["requires_grad"]) == (False, {False}, {False}):
                mode = "frozen"
            elif (b["graph"], b["bn_training"], b["requires_grad"]) == (True, {True}, {True}):
                mode = "trained"
            else:
                mode = "mixed"
            modes.setdefault(b["epoch"], set()).add(mode)
        return modes


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A resnet18 backbone weights file (random values: what counts is that the run starts from a
    file, as BackboneFreeze asks)."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(create_backbone("resnet18").state_dict(), path)
    return str(path)


def make_module(weights: str, cls: type = LandmarkRetrievalModule, **changes) -> LandmarkRetrievalModule:
    options = dict(num_classes=12, backbone="resnet18", head="gem", embedding_dim=16, backbone_lr_mult=BACKBONE_LR_MULT,
                   pretrained_weights=weights)
    return cls(**{**options, **changes})


def make_datamodule(synthetic_data: Path) -> GLDv2DataModule:
    return GLDv2DataModule(str(synthetic_data / "gldv2"), csv="train.csv", image_size=64, batch_size=8, num_workers=0,
                           val_fraction=0.2)


def fit(root: Path, synthetic_data: Path, module: pl.LightningModule, callbacks: list[Callback], ckpt_path=None,
        **trainer_options) -> pl.Trainer:
    options = dict(max_epochs=EPOCHS, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0)
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = pl.Trainer(accelerator="cpu", devices=1, default_root_dir=root, logger=CSVLogger(root, name="csv"),
                         callbacks=callbacks, enable_checkpointing=checkpointing, enable_progress_bar=False,
                         enable_model_summary=False, **{**options, **trainer_options})
    trainer.fit(module, make_datamodule(synthetic_data), ckpt_path=ckpt_path)
    return trainer


def logged_frozen(trainer: pl.Trainer) -> dict[int, float]:
    """``train/backbone_frozen`` per epoch, as the CSV logger wrote it."""
    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as f:
        return {int(row["epoch"]): float(row[FROZEN_METRIC]) for row in csv.DictReader(f) if row.get(FROZEN_METRIC)}


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory, synthetic_data, weights):
    """A 3-epoch fit with ``BackboneFreeze(unfreeze_at_epoch=2)``, a checkpoint after every epoch."""
    root = tmp_path_factory.mktemp("frozen_run")
    pl.seed_everything(0)
    recorder = Recorder()
    checkpoints = ModelCheckpoint(root / "ckpt", filename="e{epoch}", auto_insert_metric_name=False, save_top_k=-1)
    module = make_module(weights)
    trainer = fit(root, synthetic_data, module, [BackboneFreeze(unfreeze_at_epoch=UNFREEZE_AT), recorder, checkpoints])
    return trainer, module, recorder, root / "ckpt"


def test_frozen_epochs_leave_the_backbone_bit_identical_and_the_next_epoch_trains_it(frozen_run):
    trainer, module, recorder, _ = frozen_run
    start, states = recorder.states["start"], recorder.states
    assert trainer.current_epoch == EPOCHS
    for epoch in (0, 1):
        backbone = states[epoch]["backbone"]
        # Weights and every batch-norm buffer (running_mean/var, num_batches_tracked): AdamW skipped
        # the gradient-less parameters, weight decay included, and the statistics did not move.
        assert same(backbone, start["backbone"]) == list(backbone)
        before = start if epoch == 0 else states[epoch - 1]
        assert same(states[epoch]["head"], before["head"]) == [], f"the head did not learn in epoch {epoch}"
        assert same(states[epoch]["class_weights"], before["class_weights"]) == []
    trained = states[2]["backbone"]
    unchanged = same(trained, states[1]["backbone"])
    assert not any(k.endswith(("weight", "running_mean", "running_var", "num_batches_tracked")) for k in unchanged), unchanged
    # No backward pass through the backbone while frozen: the head's input carried no graph.
    assert recorder.modes() == {0: {"frozen"}, 1: {"frozen"}, 2: {"trained"}}
    assert len(recorder.batches) == 3 * EPOCHS
    assert logged_frozen(trainer) == {0: 1.0, 1: 1.0, 2: 0.0}
    # The optimizer kept the groups the module built: the backbone's at backbone_lr_mult of the head's rate.
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert sorted(groups) == ["backbone", "backbone_no_decay", "class_weights", "head", "head_no_decay"]
    assert groups["backbone"]["lr"] == pytest.approx(BACKBONE_LR_MULT * groups["head"]["lr"])
    assert all(p.requires_grad for p in module.parameters())


def test_checkpoints_hold_no_callback_state(frozen_run):
    _, _, _, ckpt_dir = frozen_run
    saved = torch.load(ckpt_dir / "e0.ckpt", map_location="cpu", weights_only=False)
    assert not [key for key in saved["callbacks"] if "BackboneFreeze" in key]


def test_resume_from_a_frozen_epoch_stays_frozen_until_the_unfreeze_epoch(frozen_run, synthetic_data, tmp_path,
                                                                          weights):
    _, _, _, ckpt_dir = frozen_run
    recorder = Recorder()
    trainer = fit(tmp_path, synthetic_data, make_module(weights), [BackboneFreeze(unfreeze_at_epoch=UNFREEZE_AT), recorder],
                  ckpt_path=ckpt_dir / "e0.ckpt")
    saved = torch.load(ckpt_dir / "e0.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    start = recorder.states["start"]["backbone"]
    assert all(torch.equal(value, saved[key]) for key, value in start.items())  # the checkpoint's backbone
    assert same(recorder.states[1]["backbone"], start) == list(start)
    assert recorder.modes() == {1: {"frozen"}, 2: {"trained"}}
    assert logged_frozen(trainer) == {1: 1.0, 2: 0.0}


@pytest.mark.filterwarnings("ignore:resuming at step")  # max_epochs 3 -> 4 redraws the LR schedule
def test_resume_after_unfreezing_trains_the_backbone_from_the_first_batch(frozen_run, synthetic_data, tmp_path,
                                                                         weights):
    _, _, _, ckpt_dir = frozen_run
    recorder = Recorder()
    trainer = fit(tmp_path, synthetic_data, make_module(weights), [BackboneFreeze(unfreeze_at_epoch=UNFREEZE_AT), recorder],
                  ckpt_path=ckpt_dir / "e2.ckpt", max_epochs=EPOCHS + 1)
    assert recorder.modes() == {3: {"trained"}} and len(recorder.batches) == 3
    assert not same(recorder.states[3]["backbone"], recorder.states["start"]["backbone"])
    assert logged_frozen(trainer) == {3: 0.0}


class TrainAfterValidation(LandmarkRetrievalModule):
    """Puts every submodule back into train mode after validation (as an override calling the
    base hook, ``self.trainer.model.train()``, does), instead of Lightning's mode restore."""

    def on_validation_model_train(self) -> None:
        self.train()


def test_a_run_that_never_unfreezes_warns_keeps_batch_norm_in_eval_after_validation_and_restores_the_module(
    synthetic_data, tmp_path, weights
):
    recorder = Recorder()
    module = make_module(weights, TrainAfterValidation)
    kept = module.model.backbone.conv1.weight
    kept.requires_grad_(False)  # frozen by the user before the run: the optimizer leaves it out
    with pytest.warns(UserWarning, match="never trained"):
        fit(tmp_path, synthetic_data, module, [BackboneFreeze(unfreeze_at_epoch=1), recorder], max_epochs=1,
            limit_train_batches=4, val_check_interval=2)  # a validation in the middle of the epoch
    # Batches 3 and 4 ran after a validation that switched every layer to train mode.
    assert len(recorder.batches) == 4 and recorder.modes() == {0: {"frozen"}}
    backbone = recorder.states[0]["backbone"]
    assert same(backbone, recorder.states["start"]["backbone"]) == list(backbone)
    assert not kept.requires_grad  # still the user's choice
    assert all(p.requires_grad for name, p in module.named_parameters() if name != "model.backbone.conv1.weight")
    assert all(m.training for m in module.modules())


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_unfreeze_epoch_must_be_a_whole_number_of_epochs(value):
    with pytest.raises(OptionError, match=r"unfreeze_at_epoch must be a whole number of epochs >= 0.*got"):
        BackboneFreeze(unfreeze_at_epoch=value)


def test_a_module_without_a_backbone_is_refused_at_setup(tmp_path):
    class NoBackbone(pl.LightningModule):
        pass

    with pytest.raises(OptionError, match="model.backbone"):
        BackboneFreeze().setup(pl.Trainer(accelerator="cpu", logger=False), NoBackbone(), "fit")


def test_frozen_epochs_of_a_backbone_with_random_weights_are_refused_at_setup(weights):
    trainer = pl.Trainer(accelerator="cpu", logger=False)
    with pytest.raises(OptionError, match=r"BackboneFreeze\(unfreeze_at_epoch=2\) keeps the backbone as it starts, "
                                          r"but this run starts it from random weights.*--model.init_from"):
        BackboneFreeze(unfreeze_at_epoch=2).setup(trainer, make_module(None), "fit")
    BackboneFreeze(unfreeze_at_epoch=0).setup(trainer, make_module(None), "fit")  # never frozen: fine
    BackboneFreeze(unfreeze_at_epoch=2).setup(trainer, make_module(weights), "fit")
    with pytest.raises(OptionError, match=r"give model.init_from .* or model.pretrained_weights .*, not both"):
        make_module(weights, init_from="runs/demo/checkpoints/last.ckpt")


# ------------------------------------------------------------------------------ DDP (2 CPU processes)
class RecordBackbone(Callback):
    """DDP probe: each rank saves its backbone parameters at training start and after every epoch,
    and whether the backbone was frozen in each epoch, to ``<out_dir>/rank<r>.pt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.saved: dict = {"frozen": {}}

    def _params(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pl_module.model.backbone.named_parameters()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saved["start"] = self._params(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        frozen = not any(p.requires_grad for p in pl_module.model.backbone.parameters())
        self.saved["frozen"].setdefault(trainer.current_epoch, set()).add(frozen)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saved[trainer.current_epoch] = self._params(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.saved, self.out_dir / f"rank{trainer.global_rank}.pt")


def run_ddp(tmp_path: Path, synthetic_data: Path, strategy: str) -> subprocess.CompletedProcess:
    """``train.py fit`` on 2 CPU processes, 2 epochs of 2 steps, BackboneFreeze(unfreeze_at_epoch=1)
    from the YAML config (the ``trainer.callbacks`` entry the README shows)."""
    weights = tmp_path / "resnet18.pth"
    torch.save(create_backbone("resnet18").state_dict(), weights)
    config_path = write_config(tmp_path, synthetic_data, backbone_lr_mult=BACKBONE_LR_MULT, pretrained_weights=str(weights))
    config = yaml.safe_load(config_path.read_text())
    config["trainer"]["callbacks"].append(
        {"class_path": "callbacks.backbone_freeze.BackboneFreeze", "init_args": {"unfreeze_at_epoch": 1}}
    )
    config_path.write_text(yaml.safe_dump(config))
    command = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config_path), "--trainer.logger=false",
               "--trainer.devices=2", f"--trainer.strategy={strategy}", "--trainer.max_epochs=2",
               "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
               "--trainer.callbacks+=test_backbone_freeze.RecordBackbone", f"--trainer.callbacks.out_dir={tmp_path / 'probe'}"]
    return subprocess.run(command, env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_ddp_ranks_hold_identical_backbones_after_unfreezing(tmp_path, synthetic_data):
    result = run_ddp(tmp_path, synthetic_data, "ddp_find_unused_parameters_true")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "probe" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for saved in ranks:
        assert saved["frozen"] == {0: {True}, 1: {False}}
        assert all(torch.equal(saved[0][k], v) for k, v in saved["start"].items())  # frozen epoch: untouched
        assert not any(torch.equal(saved[1][k], v) for k, v in saved["start"].items() if k.endswith("weight"))
    # Each rank trained on its own half of every batch: only the gradient all-reduce makes them agree.
    assert all(torch.equal(ranks[0][1][k], ranks[1][1][k]) for k in ranks[0][1])


@pytest.mark.slow
def test_ddp_without_find_unused_parameters_is_refused_before_the_first_step(tmp_path, synthetic_data):
    result = run_ddp(tmp_path, synthetic_data, "ddp")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train.py: error: BackboneFreeze(unfreeze_at_epoch=1)" in result.stderr
    assert "set trainer.strategy: ddp_find_unused_parameters_true" in result.stderr
    assert not (tmp_path / "probe").exists()  # no rank reached the end of training
    assert earlier_run_files(tmp_path / "run") == []  # refused before fit started: the folder is free for the fix
