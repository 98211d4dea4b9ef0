"""End-to-end training through train.py's CLI on generated data: fit, logging, resume, DDP, bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from child_env import child_env
import train
import wandb_records
from run_probes import RecordStartState
from callbacks.finite_loss import NonFiniteLossError
from sg_train.module import LandmarkRetrievalModule

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, data_root: Path, **model_changes) -> Path:
    """configs/demo.yaml, made tiny and pointed at ``tmp_path``."""
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    run_dir = tmp_path / "run"
    trainer = config["trainer"]
    trainer.update(default_root_dir=str(run_dir), max_epochs=1, log_every_n_steps=1, enable_progress_bar=False)
    # Retrieval validation has its own tests (test_retrieval_callback.py); keep these runs short.
    trainer["callbacks"] = [c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    trainer["callbacks"][0]["init_args"].update(monitor=None, filename="step{step}")
    config["model"].update(backbone="resnet18", embedding_dim=32, **model_changes)
    config["data"]["init_args"].update(
        data_root=str(data_root / "gldv2"), image_size=64, batch_size=8, num_workers=0, val_fraction=0.2
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_two_steps_logs_loss_accuracy_lr_and_scale_to_wandb(tmp_path, synthetic_data):
    config = write_config(tmp_path, synthetic_data)
    cli = train.main(["fit", "--config", str(config), "--trainer.limit_train_batches=2"])
    assert cli.trainer.global_step == 2
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 12
    rows = wandb_records.history(wandb_records.run_file(tmp_path / "run"))
    logged = set().union(*rows)
    for key in ("train/loss", "train/acc_step", "lr-AdamW/head", "lr-AdamW/backbone", "train/loss_scale", "train/loss_margin"):
        assert key in logged, f"{key} not logged (logged: {sorted(logged)})"
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == 2 and all(l > 0 for l in losses)
    assert "val/GAP" in logged and "val/acc" in logged
    run_config = wandb_records.config(wandb_records.run_file(tmp_path / "run"))
    assert run_config["backbone"] == "resnet18" and run_config["loss"] == "arcface"


def test_resume_from_checkpoint_restores_weights_optimizer_schedule_and_loss_buffers(tmp_path, synthetic_data):
    config = write_config(tmp_path, synthetic_data, loss="curricularface", loss_options={"s": 30.0, "m": 0.15})
    train.main(["fit", "--config", str(config), "--trainer.limit_train_batches=3", "--trainer.max_epochs=1"])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3
    assert float(saved["state_dict"]["loss_fn.t"]) != 0.0  # CurricularFace's running t moved

    cli = train.main(["fit", "--config", str(config), "--trainer.limit_train_batches=3", "--trainer.max_epochs=2",
                      "--trainer.callbacks+=run_probes.RecordStartState", f"--ckpt_path={last}"])
    probe = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RecordStartState))
    assert probe.global_step == 3
    for key, value in saved["state_dict"].items():
        assert torch.equal(probe.state[key], value), key
    saved_opt = saved["optimizer_states"][0]
    assert probe.optimizer_state["state"].keys() == saved_opt["state"].keys()
    for param_id, state in saved_opt["state"].items():
        assert torch.equal(probe.optimizer_state["state"][param_id]["exp_avg"], state["exp_avg"])
    assert probe.lr == [g["lr"] for g in saved_opt["param_groups"]]
    assert cli.trainer.global_step == 6


def test_gradients_reach_backbone_fc_class_weights_and_gem_p():
    module = LandmarkRetrievalModule(num_classes=5, backbone="resnet18", head="gem", embedding_dim=16)
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    module.loss_fn(module.model(images), labels).loss.backward()
    named = dict(module.named_parameters())
    for name in ("model.backbone.conv1.weight", "model.backbone.layer4.1.bn2.weight", "model.fc.weight", "model.head.pool.p", "loss_fn.weight"):
        grad = named[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


class _PoisonWeights(Callback):
    """Make the weights NaN before batch ``at`` so that its loss is NaN."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            with torch.no_grad():
                pl_module.model.fc.weight.fill_(float("nan"))


def test_nonfinite_loss_stops_naming_step_and_batch_and_keeps_checkpoints(tmp_path, synthetic_data):
    config = write_config(tmp_path, synthetic_data)
    cli = train.main(["--config", str(config), "--trainer.max_steps=5"], run=False)
    checkpoint_cb = cli.trainer.checkpoint_callback
    checkpoint_cb._every_n_train_steps = 1
    cli.trainer.callbacks.insert(0, _PoisonWeights(at=2))
    with pytest.raises(NonFiniteLossError, match=r"global step 2, epoch 0, batch 2"):
        cli.trainer.fit(cli.model, cli.datamodule)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step2.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_corrupt_missing_and_truncated_images_are_skipped_counted_and_reported(tmp_path, synthetic_data):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data / "gldv2", data / "gldv2")
    images = sorted((data / "gldv2" / "train").rglob("*.jpg"))
    images[0].write_bytes(b"not a jpeg at all")
    images[1].write_bytes(images[1].read_bytes()[:200])
    images[2].unlink()
    bad = {p.stem for p in images[:3]}
    config = write_config(tmp_path, data)
    cli = train.main(["fit", "--config", str(config), "--data.val_fraction=0"])
    assert cli.trainer.current_epoch == 1  # the epoch finished
    report = (tmp_path / "run" / "skipped_images.tsv").read_text().splitlines()
    reported = {Path(line.split("\t")[2]).stem for line in report}
    assert reported == bad
    rows = wandb_records.history(wandb_records.run_file(tmp_path / "run"))
    assert [row["data/skipped_train"] for row in rows if "data/skipped_train" in row] == [3]


def test_unknown_loss_backbone_and_head_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="arcface"):
        LandmarkRetrievalModule(num_classes=3, backbone="resnet18", loss="arcfaec")
    with pytest.raises(ValueError, match="gemp"):
        LandmarkRetrievalModule(num_classes=3, backbone="resnet18", head="gem_plus")
    with pytest.raises(ValueError, match="resnet18"):
        LandmarkRetrievalModule(num_classes=3, backbone="resnet18x")


def test_ddp_two_processes_madacos_uses_the_global_batch_median(tmp_path, synthetic_data):
    """2-process CPU DDP through train.py (a subprocess: DDP inside pytest would re-launch pytest)."""
    config = write_config(tmp_path, synthetic_data, loss="madacos", loss_options={"rho": 0.02})
    env = child_env()
    probe_dir = tmp_path / "probe"
    command = [
        sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config),
        "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=2", "--trainer.logger=false",
        "--trainer.callbacks+=ddp_probe.RecordLossStats", f"--trainer.callbacks.out_dir={probe_dir}",
    ]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rank["world_size"] == 2 for rank in ranks)
    for row0, row1 in zip(ranks[0]["rows"], ranks[1]["rows"], strict=True):
        assert row0["labels"] != row1["labels"]  # each rank trained on its own shard...
        assert row0["median_cosine"] == row1["median_cosine"]  # ...but the median is the global one
        assert row0["scale"] == row1["scale"] and row0["margin"] == row1["margin"]
