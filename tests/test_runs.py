"""Runs that survive and tell the truth: run folders, last.ckpt, resume, pre-flight checks (train.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from child_env import child_env
import train
import wandb_records
from callbacks.retrieval_eval import RetrievalEvaluationError
from run_probes import LogMetricPerEpoch
from sg_train.run_folder import RunFolderError, earlier_run_files

ROOT = Path(__file__).resolve().parents[1]


def demo_config(tmp_path: Path, data: Path, *, retrieval: dict | None = None, **trainer_changes) -> Path:
    """configs/demo.yaml made tiny: run folder ``tmp_path/run``, generated data, resnet18 at 64 px."""
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    trainer = config["trainer"]
    trainer.update({"default_root_dir": str(tmp_path / "run"), "max_epochs": 2, "log_every_n_steps": 1,
                    "enable_progress_bar": False, **trainer_changes})
    callbacks = trainer["callbacks"]
    if retrieval is None:
        trainer["callbacks"] = [c for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
        trainer["callbacks"][0]["init_args"].update(monitor=None, filename="epoch{epoch}", every_n_epochs=1)
    else:
        callbacks[0]["init_args"]["every_n_epochs"] = 1
        callbacks[1]["init_args"].update(data_root=str(data / "revisited"), batch_size=8, progress=False,
                                         every_n_epochs=1, scales=[1.0], **retrieval)
    config["model"].update(backbone="resnet18", embedding_dim=32)
    config["data"]["init_args"].update(data_root=str(data / "gldv2"), image_size=64, batch_size=8, num_workers=0, val_fraction=0.2)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def run_train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], env=child_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------- last.ckpt

def test_last_ckpt_is_the_last_epoch_even_when_the_monitor_got_worse(tmp_path, synthetic_data):
    """A user's plain ModelCheckpoint(monitor=..., save_last=True): Lightning 2.6 alone leaves last.ckpt at epoch 0."""
    config = demo_config(tmp_path, synthetic_data)
    cli = train.main(["--config", str(config), "--trainer.callbacks.init_args.monitor=probe/score",
                      "--trainer.callbacks.init_args.mode=max", "--trainer.callbacks.init_args.save_last=true",
                      "--trainer.limit_train_batches=2"], run=False)
    cli.trainer.callbacks.insert(0, LogMetricPerEpoch("probe/score", [0.9, 0.1]))  # epoch 1 is worse
    cli.trainer.fit(cli.model, cli.datamodule)
    checkpoints = tmp_path / "run" / "checkpoints"
    last = load(checkpoints / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 4)
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["epoch0.ckpt", "last.ckpt"]  # best stays epoch 0
    final = {k: v for k, v in cli.model.state_dict().items()}
    assert all(torch.equal(last["state_dict"][k], v) for k, v in final.items())


# ----------------------------------------------------------------------------- run folders

def test_default_root_dir_decides_where_every_file_of_the_run_goes(tmp_path, synthetic_data):
    config = demo_config(tmp_path, synthetic_data, retrieval={"evaluate_before_training": False})
    elsewhere = tmp_path / "exp2"
    train.main(["fit", "--config", str(config), f"--trainer.default_root_dir={elsewhere}",
                "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"])
    assert not (tmp_path / "run").exists()
    names = {p.relative_to(elsewhere).as_posix() for p in elsewhere.rglob("*") if p.is_file()}
    for expected in ("run.json", "config.yaml", "results.json", "checkpoints/last.ckpt"):
        assert expected in names, sorted(names)
    assert any(name.startswith("checkpoints/epoch00-mapM") for name in names)
    assert wandb_records.run_file(elsewhere).is_file()
    run = json.loads((elsewhere / "run.json").read_text())
    assert run["wandb_id"] == wandb_records.run_file(elsewhere).stem.removeprefix("run-")


def test_a_new_run_never_reuses_a_folder_that_holds_a_run(tmp_path, synthetic_data):
    config = demo_config(tmp_path, synthetic_data)
    train.main(["fit", "--config", str(config), "--trainer.max_epochs=1", "--trainer.limit_train_batches=1"])
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(RunFolderError, match=r"already holds a run.*--ckpt_path .*last\.ckpt.*default_root_dir"):
        train.main(["fit", "--config", str(config), "--trainer.max_epochs=1"])
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before  # no last-v1.ckpt
    other = tmp_path / "other"
    with pytest.raises(RunFolderError, match="belongs to the run folder"):
        train.main(["fit", "--config", str(config), f"--trainer.default_root_dir={other}",
                    f"--ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}"])


def test_ckpt_path_last_starts_again_a_run_that_ended_before_its_first_checkpoint(tmp_path, synthetic_data):
    """A job script re-submitted with ``--ckpt_path last`` after its first attempt died in epoch 0
    (killed, or stopped by bad data): nothing can be continued, so the same command starts it again."""
    config = demo_config(tmp_path, synthetic_data)
    args = ["fit", "--config", str(config), "--trainer.max_epochs=1", "--trainer.limit_train_batches=1"]
    train.main(args)
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if killed before the first epoch ended
    with pytest.raises(RunFolderError, match=r"saved no checkpoint to continue from: start it again with --ckpt_path last"):
        train.main(args)
    cli = train.main([*args, "--ckpt_path=last"])
    assert cli.trainer.global_step == 1 and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert len(json.loads((tmp_path / "run" / "run.json").read_text())["starts"]) == 2
    with pytest.raises(RunFolderError, match=r"already holds a run.*continue it with --ckpt_path"):
        train.main(args)  # now it has a checkpoint: continued, never started again


def test_unwritable_run_or_checkpoint_folder_stops_before_training(tmp_path, synthetic_data):
    config = demo_config(tmp_path, synthetic_data)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(RunFolderError, match="a_file"):
        train.main(["fit", "--config", str(config), f"--trainer.default_root_dir={blocker / 'run'}"])
    with pytest.raises(RunFolderError, match=r"checkpoint folder .*a_file"):
        train.main(["fit", "--config", str(config), f"--trainer.callbacks.init_args.dirpath={blocker / 'ckpts'}"])
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not (tmp_path / "run" / "run.json").exists()


def test_empty_checkpoint_is_named(tmp_path, synthetic_data):
    config = demo_config(tmp_path, synthetic_data)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(RunFolderError, match=r"empty\.ckpt.*0 bytes"):
        train.main(["fit", "--config", str(config), f"--ckpt_path={empty}"])


def test_only_fit_and_validate_are_offered(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    assert "fit" in text and "validate" in text and "predict" not in text and "{fit,validate}" in text


# ----------------------------------------------------------------------------- pre-flight

@pytest.mark.parametrize("mistake", ["image_dir", "upper_case_ids", "flat_folder"])
def test_wrong_training_paths_stop_before_the_first_step(tmp_path, synthetic_data, mistake):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data / "gldv2", data / "gldv2")
    args = []
    if mistake == "image_dir":
        args.append(f"--data.image_dir={data / 'gldv2'}")
    elif mistake == "upper_case_ids":
        shutil.rmtree(data / "gldv2" / "splits", ignore_errors=True)
        csv = data / "gldv2" / "train.csv"
        lines = csv.read_text().splitlines()
        csv.write_text("\n".join([lines[0]] + [line.split(",", 1)[0].upper() + "," + line.split(",", 1)[1] for line in lines[1:]]) + "\n")
    else:
        flat = data / "flat"
        flat.mkdir()
        for image in (data / "gldv2" / "train").rglob("*.jpg"):
            shutil.copy(image, flat / image.name)
        args.append(f"--data.image_dir={flat}")
    (data / "revisited").symlink_to(synthetic_data / "revisited")
    config = demo_config(tmp_path, data)
    with pytest.raises(FileNotFoundError, match=r"sampled training images do not exist.*<id\[0\]>/<id\[1\]>/<id\[2\]>"):
        train.main(["fit", "--config", str(config), *args])
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not (tmp_path / "run" / "run.json").exists()
    assert earlier_run_files(tmp_path / "run") == []  # fixed, the same command may use the folder


def test_fewer_images_than_one_batch_names_count_and_batch_size(tmp_path, synthetic_data):
    config = demo_config(tmp_path, synthetic_data)
    with pytest.raises(ValueError, match=r"58 training images .* data\.batch_size=64; set data\.batch_size to at most 58"):
        train.main(["fit", "--config", str(config), "--data.batch_size=64"])


def test_unreadable_database_image_stops_at_setup(tmp_path, synthetic_data):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data / "revisited", data / "revisited")
    (data / "gldv2").symlink_to(synthetic_data / "gldv2")
    database_image = sorted((data / "revisited" / "rsynth" / "jpg").glob("*.jpg"))[-1]
    database_image.write_bytes(b"\xff\xd8 not really a jpeg")
    config = demo_config(tmp_path, data, retrieval={})
    with pytest.raises(Exception, match=database_image.name) as info:
        train.main(["fit", "--config", str(config)])
    assert "ImageReadError" in type(info.value).__name__ or "cannot read image" in str(info.value)
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not (tmp_path / "run" / "run.json").exists()


def test_rerank_neighbours_beyond_the_database_stop_at_setup(tmp_path, synthetic_data):
    config = demo_config(tmp_path, synthetic_data, retrieval={"K": 30})
    with pytest.raises(ValueError, match=r"K=30 needs at least 31 database images.*rsynth database has 26: lower K"):
        train.main(["fit", "--config", str(config)])
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not (tmp_path / "run" / "run.json").exists()


class _BreakBenchmarkAfterSetup(LogMetricPerEpoch):
    def __init__(self, image: Path):
        super().__init__("unused", [])
        self.image = image

    def on_validation_epoch_end(self, trainer, pl_module):
        self.image.write_bytes(b"broken after the pre-flight")


def test_failed_evaluation_during_fit_saves_the_trained_weights_first(tmp_path, synthetic_data):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data / "revisited", data / "revisited")
    (data / "gldv2").symlink_to(synthetic_data / "gldv2")
    image = sorted((data / "revisited" / "rsynth" / "jpg").glob("*.jpg"))[-1]
    good = image.read_bytes()
    config = demo_config(tmp_path, data, retrieval={"evaluate_before_training": False})
    cli = train.main(["--config", str(config), "--trainer.limit_train_batches=2", "--trainer.num_sanity_val_steps=0"], run=False)
    cli.trainer.callbacks.insert(0, _BreakBenchmarkAfterSetup(image))
    with pytest.raises(RetrievalEvaluationError,
                       match=r"epoch 0.*last\.ckpt; fix the benchmarks under .*revisited and continue with --ckpt_path"):
        cli.trainer.fit(cli.model, cli.datamodule)
    saved = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 2
    image.write_bytes(good)  # the user fixes the benchmark and continues
    cli = train.main(["fit", "--config", str(config), "--trainer.limit_train_batches=2", "--trainer.num_sanity_val_steps=0",
                      f"--ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}"])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [(e["stage"], e["epoch"]) for e in results["evaluations"]] == [("trained", 0), ("trained", 1)]
    assert cli.trainer.global_step == 4


# ----------------------------------------------------------------------------- kill -9 and resume

def test_sigkill_then_resume_loses_nothing_and_reproduces_the_uninterrupted_run(tmp_path, synthetic_data):
    """Killed mid-epoch 2 (of 3) after epoch 1's last.ckpt exists; resumed from it: same final weights, same
    results.json history and one W&B run, as a run that was never interrupted."""
    config = demo_config(tmp_path, synthetic_data, retrieval={"evaluate_before_training": True}, max_epochs=3)
    common = ["fit", "--config", str(config), "--trainer.limit_train_batches=3"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    done = run_train([*common, f"--trainer.default_root_dir={straight}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = run_train([*common, f"--trainer.default_root_dir={crashed}",
                        "--trainer.callbacks+=run_probes.KillAt", "--trainer.callbacks.epoch=2",
                        "--trainer.callbacks.batch=1"], cwd=tmp_path)
    assert killed.returncode == -9
    last = crashed / "checkpoints" / "last.ckpt"
    assert load(last)["epoch"] == 1
    resumed = run_train([*common, f"--trainer.default_root_dir={crashed}", f"--ckpt_path={last}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = load(straight / "checkpoints" / "last.ckpt"), load(last)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (2, 9)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    history = [json.loads((run / "results.json").read_text())["evaluations"] for run in (straight, crashed)]
    assert [(e["stage"], e["epoch"]) for e in history[1]] == [("before_training", 0), ("trained", 0), ("trained", 1), ("trained", 2)]
    assert history[0] == history[1]
    runs = sorted(crashed.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and len({p.stem for p in runs}) == 1  # the resumed part continues the same W&B run
    assert json.loads((crashed / "run.json").read_text())["wandb_id"] == runs[0].stem.removeprefix("run-")
    assert "retrieval rsynth (trained, epoch 2" in resumed.stderr + resumed.stdout


def test_an_epoch_cut_short_is_redone_on_resume_not_skipped(tmp_path, synthetic_data):
    """max_steps (or max_time) stops mid-epoch 1 of 7 batches: last.ckpt stays at the end of epoch 0
    (Lightning marks the cut epoch as done), so the resume trains all of epoch 1."""
    config = demo_config(tmp_path, synthetic_data)
    train.main(["fit", "--config", str(config), "--trainer.max_steps=10"])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert (load(last)["epoch"], load(last)["global_step"]) == (0, 7)
    cli = train.main(["fit", "--config", str(config), "--ckpt_path=last"])
    assert cli.trainer.global_step == 14 and (load(last)["epoch"], load(last)["global_step"]) == (1, 14)


def test_resuming_with_a_longer_run_says_the_schedule_is_redrawn(tmp_path, synthetic_data):
    config = demo_config(tmp_path, synthetic_data)
    train.main(["fit", "--config", str(config), "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.warns(UserWarning, match=r"resuming at step 2 with a learning-rate schedule of 4 .* scheduled for 2"):
        train.main(["fit", "--config", str(config), "--trainer.max_epochs=2", "--trainer.limit_train_batches=2",
                    f"--ckpt_path={last}"])
