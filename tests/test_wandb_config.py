"""The W&B run holds the whole resolved configuration, and config.yaml itself."""
from __future__ import annotations

import yaml

import train
import wandb_records
from test_runs import demo_config, run_train


def test_the_wandb_run_holds_the_whole_configuration_and_the_config_file(tmp_path, synthetic_data):
    config = demo_config(tmp_path, synthetic_data, retrieval={"rerank": True, "M": 10, "K": 2}, max_epochs=1,
                         limit_train_batches=1, limit_val_batches=1)
    train.main(["fit", "--config", str(config), "--model.optimizer.init_args.lr=0.003"])
    run_dir = tmp_path / "run"
    logged = wandb_records.config(wandb_records.run_file(run_dir / "wandb"))
    assert logged["seed_everything"] == 0
    assert logged["model"]["optimizer"]["init_args"]["lr"] == 0.003
    assert logged["data"]["class_path"] == "datamodules.gldv2.GLDv2DataModule"
    assert logged["trainer"]["max_epochs"] == 1
    retrieval = next(c for c in logged["trainer"]["callbacks"] if c["class_path"].endswith("RetrievalEvalCallback"))
    assert {k: retrieval["init_args"][k] for k in ("datasets", "scales", "protocol", "M", "K", "beta")} == {
        "datasets": ["rsynth"], "scales": [1.0], "protocol": "revisitop", "M": 10, "K": 2, "beta": 0.15}
    saved = list((run_dir / "wandb").glob("offline-run-*/files/config.yaml"))
    assert len(saved) == 1
    assert yaml.safe_load(saved[0].read_text()) == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert wandb_records.metric_definitions(wandb_records.run_file(run_dir / "wandb"))["retrieval/*"]["summary"] == [
        "max", "last"]


def test_best_and_last_checkpoints_are_model_artifacts_with_what_they_are(tmp_path, synthetic_data):
    config = demo_config(tmp_path, synthetic_data, retrieval={"rerank": False}, max_epochs=2, limit_train_batches=1,
                         limit_val_batches=1)
    train.main(["fit", "--config", str(config), "--trainer.callbacks+=callbacks.checkpoint_artifacts.CheckpointArtifacts"])
    found = wandb_records.artifacts(wandb_records.run_file(tmp_path / "run" / "wandb"))
    logged = {alias: a for a in found for alias in a["aliases"] if alias != "latest"}
    assert set(logged) == {"best", "last"} and all(a["type"] == "model" and a["files"] == ["model.ckpt"]
                                                   for a in logged.values())
    best, last = logged["best"]["metadata"], logged["last"]["metadata"]
    assert best["monitor"] == "retrieval/rsynth/mAP_M" and 0 <= best["score"] <= 1
    assert last["epoch"] == 1 and last["global_step"] == 2 and last["file"] == "last.ckpt"
    assert last["protocol"] == "custom" and last["model"]["backbone"] == "resnet18"  # revisitop at scales [1.0]
    assert set(last["retrieval"]) >= {"retrieval/rsynth/mAP_E", "retrieval/rsynth/mAP_M", "retrieval/rsynth/mAP_H"}


def test_no_artifact_is_staged_when_wandb_is_disabled(tmp_path, synthetic_data, monkeypatch):
    """W&B would stage a full copy of each checkpoint even for a disabled run."""
    import callbacks.checkpoint_artifacts as module

    class Refused(module.wandb.Artifact):
        def __init__(self, *args, **kwargs):
            raise AssertionError("an artifact was built for a disabled W&B run")

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(module.wandb, "Artifact", Refused)
    config = demo_config(tmp_path, synthetic_data, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    train.main(["fit", "--config", str(config), "--trainer.callbacks+=callbacks.checkpoint_artifacts.CheckpointArtifacts"])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "run" / "wandb").exists()


def test_ddp_with_the_wandb_logger_fits_and_validate_leaves_the_runs_config_alone(tmp_path, synthetic_data):
    """Every shipped config logs to W&B: under DDP, saving the configuration asked rank 0 alone for
    the (collective) log folder and both ranks waited forever. And ``validate`` rewrote the fit's
    config.yaml, which resuming reads back."""
    config = demo_config(tmp_path, synthetic_data, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    fit = run_train(["fit", "--config", str(config), "--trainer.devices=2", "--trainer.strategy=ddp"], cwd=tmp_path)
    assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-3000:]
    run_dir = tmp_path / "run"
    fitted = (run_dir / "config.yaml").read_text()
    assert str(yaml.safe_load(fitted)["trainer"]["devices"]) == "2"
    last = run_dir / "checkpoints" / "last.ckpt"
    validate = run_train(["validate", "--config", str(config), f"--ckpt_path={last}"], cwd=tmp_path)
    assert validate.returncode == 0, validate.stdout[-3000:] + validate.stderr[-3000:]
    assert (run_dir / "config.yaml").read_text() == fitted
    assert "ckpt_path" in yaml.safe_load((run_dir / "validate_config.yaml").read_text())
