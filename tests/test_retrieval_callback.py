"""RetrievalEvalCallback: per-epoch Revisited mAP during training and validation, DDP-exact."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
import numpy as np
import pytest
import yaml

from child_env import child_env
from callbacks.retrieval_eval import RetrievalEvalCallback
from datamodules.gldv2 import GLDv2DataModule
from datamodules.labelled import LabelledImagesDataModule
from sg_train.errors import OptionError
from sg_train.module import LandmarkRetrievalModule
from sg_train.synthetic.class_folders import generate_class_folders

ROOT = Path(__file__).resolve().parents[1]
KEYS = [f"retrieval/rsynth/{kind}_{p}" for kind in ("mAP", "rerank_mAP") for p in "EMH"]


def tiny_module(num_classes: int) -> LandmarkRetrievalModule:
    return LandmarkRetrievalModule(num_classes=num_classes, backbone="resnet18", head="gem+sgem", embedding_dim=32)


def tiny_callback(synthetic_data: Path, **options) -> RetrievalEvalCallback:
    return RetrievalEvalCallback(
        data_root=str(synthetic_data / "revisited"), datasets=["rsynth"], batch_size=4, num_workers=0, progress=False, **options
    )


def test_validate_logs_map_with_and_without_rerank(synthetic_data, tmp_path):
    datamodule = GLDv2DataModule(str(synthetic_data / "gldv2"), csv="train.csv", image_size=64, batch_size=8, num_workers=0, val_fraction=0.2)
    callback = tiny_callback(synthetic_data, scales=[0.7071, 1.0])
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path, enable_progress_bar=False)
    trainer.validate(tiny_module(datamodule.num_classes), datamodule)
    for key in KEYS:
        assert 0.0 <= float(trainer.callback_metrics[key]) <= 1.0, key
    assert "val/GAP" in trainer.callback_metrics


def test_fit_without_validation_split_evaluates_before_and_after_training_and_writes_results(synthetic_data, tmp_path):
    datamodule = GLDv2DataModule(str(synthetic_data / "gldv2"), csv="train.csv", image_size=64, batch_size=8, num_workers=0, val_fraction=0.0)
    results_file = tmp_path / "results.json"  # <run folder = default_root_dir>/results.json
    callback = tiny_callback(synthetic_data, scales=[1.0], evaluate_before_training=True)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path, max_epochs=1,
        limit_train_batches=2, enable_progress_bar=False, enable_checkpointing=False,
    )
    trainer.fit(tiny_module(datamodule.num_classes), datamodule)
    results = json.loads(results_file.read_text())
    assert [(e["stage"], e["epoch"], e["global_step"]) for e in results["evaluations"]] == [("before_training", 0, 0), ("trained", 0, 2)]
    assert results["before_training"] == results["evaluations"][0] and results["trained"] == results["evaluations"][1]
    for stage in results["evaluations"]:
        assert set(stage["mAP"]) == set("EMH") and set(stage["rerank_mAP"]) == set("EMH")
        assert stage["mAP"] == stage["per_dataset"]["rsynth"]["mAP"]  # one data set: the mean is its value
    assert results["trained"]["epoch"] == 0
    assert float(trainer.callback_metrics["retrieval/rsynth/mAP_M"]) == pytest.approx(results["trained"]["mAP"]["M"], rel=1e-6)


def test_missing_benchmark_is_reported_at_setup(synthetic_data, tmp_path):
    callback = tiny_callback(synthetic_data)
    callback.datasets = ["roxford5k"]
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path)
    datamodule = GLDv2DataModule(str(synthetic_data / "gldv2"), csv="train.csv", image_size=64, batch_size=8, num_workers=0)
    with pytest.raises(FileNotFoundError, match="gnd_roxford5k.pkl"):
        trainer.validate(tiny_module(datamodule.num_classes), datamodule)


def validate_on_one_and_two_processes(config: dict, retrieval: dict, tmp_path: Path) -> dict[str, float]:
    """Run ``train.py validate`` with ``config`` and the retrieval callback options ``retrieval`` on 1
    and on 2 CPU processes (subprocesses: DDP inside pytest re-launches pytest); assert that both ranks
    of the 2-process run logged exactly the single-process ``retrieval/...`` metrics, and return them."""
    config["trainer"].update(logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path / "run"))
    config["trainer"]["callbacks"] = [
        {"class_path": "callbacks.retrieval_eval.RetrievalEvalCallback",
         "init_args": {"batch_size": 3, "num_workers": 0, "progress": False, **retrieval}},
        {"class_path": "ddp_probe.RecordRetrievalMetrics", "init_args": {"out_dir": str(tmp_path / "probe")}},
    ]
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, allow_unicode=True))
    env = child_env()
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        command = [sys.executable, str(ROOT / "train.py"), "validate", "--config", str(config_path),
                   f"--trainer.devices={devices}", f"--trainer.strategy={strategy}"]
        result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    single = json.loads((tmp_path / "probe" / "world1_rank0.json").read_text())
    for rank in (0, 1):
        assert json.loads((tmp_path / "probe" / f"world2_rank{rank}.json").read_text()) == single
    return single


def test_ddp_two_processes_give_the_single_process_numbers_exactly(synthetic_data, tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["model"].update(backbone="resnet18", embedding_dim=32, head="rgem+gemp+sgem")
    config["data"]["init_args"].update(data_root=str(synthetic_data / "gldv2"), image_size=64, batch_size=8, num_workers=0)
    retrieval = {"data_root": str(synthetic_data / "revisited"), "datasets": ["rsynth"]}
    assert sorted(validate_on_one_and_two_processes(config, retrieval, tmp_path)) == sorted(KEYS)


def test_ddp_held_out_photos_give_the_single_process_numbers_exactly(tmp_path):
    """Your photos' held-out benchmark (leave-one-out, SuperGlobal rerank) on 1 and 2 processes:
    15 held-out photos do not split evenly over two ranks, so a padded or repeated photo would show."""
    photos = tmp_path / "My Photos"
    generate_class_folders(photos, landmarks=5, views=7, image_size=64, progress=False)
    config = yaml.safe_load((ROOT / "configs" / "finetune_folder.yaml").read_text())
    config["model"].update(embedding_dim=32)
    config["data"]["init_args"].update(images=str(photos), image_size=64, batch_size=8, num_workers=0, val_fraction=0.4)
    retrieval = {"held_out": True, "ks": [1, 5], "M": 6, "K": 2}
    metrics = validate_on_one_and_two_processes(config, retrieval, tmp_path)
    assert sorted(metrics) == sorted(RetrievalEvalCallback(**retrieval).metric_names())  # what the monitor check knows
    (split_file,) = (photos / ".sg-train").glob("held_out_*.json")
    assert len(json.loads(split_file.read_text())["held_out"]) == 15  # 3 of each class of 7

def test_a_held_out_photo_cut_short_is_left_out_of_the_benchmark_not_the_run(tmp_path):
    """A photo whose header reads but whose data is cut short passes the data check; held out, it
    is decoded whole when the benchmark is built, named in a warning and left out (the split and
    the resume check stay as they were), instead of stopping the evaluation."""
    photos = tmp_path / "My Photos"
    generate_class_folders(photos, landmarks=4, views=6, image_size=64, progress=False)

    def datamodule() -> LabelledImagesDataModule:
        return LabelledImagesDataModule(images=str(photos), val_fraction=0.4, image_size=64, batch_size=4,
                                        num_workers=0)

    before = datamodule()
    digest, held = before.held_out_digest(), int(before.held_out.sum())
    victim = Path(before.data.path(int(np.flatnonzero(before.held_out)[0])))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

    data = datamodule()
    callback = RetrievalEvalCallback(held_out=True, ks=[1, 5], M=4, K=2, batch_size=4, num_workers=0, progress=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path / "run",
                         enable_progress_bar=False)
    with pytest.warns(UserWarning, match=rf"1 image\(s\) cannot be decoded .*held_out benchmark.*{victim.name}"):
        trainer.validate(tiny_module(data.num_classes), data)
    assert len(callback._datasets["held_out"][0]) == held - 1
    assert 0.0 <= float(trainer.callback_metrics["retrieval/held_out/MAP@R"]) <= 1.0
    assert data.held_out_digest() == digest  # a resume is not refused for it
    assert victim.name not in {Path(p).name for p in np.array(data.data.paths)[~data.held_out]}  # nor trained on


def test_a_checkpoint_monitoring_a_metric_never_logged_stops_before_the_first_step(synthetic_data, tmp_path):
    """The CFCD configs monitor roxford5k; evaluating only rsynth used to train a whole epoch and
    then stop at the first save with nothing saved."""
    callback = tiny_callback(synthetic_data)
    assert callback.metric_names() == [f"retrieval/rsynth/{m}" for m in ("mAP_E", "mAP_M", "mAP_H", "rerank_mAP_E",
                                                                         "rerank_mAP_M", "rerank_mAP_H")]
    datamodule = GLDv2DataModule(str(synthetic_data / "gldv2"), csv="train.csv", image_size=64, batch_size=8, num_workers=0)
    watch = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="retrieval/roxford5k/mAP_M", mode="max")
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[callback, watch], default_root_dir=tmp_path,
                         max_epochs=1, enable_progress_bar=False)
    module = tiny_module(datamodule.num_classes)
    with pytest.raises(OptionError, match=r"monitor='retrieval/roxford5k/mAP_M'\) watches a metric this run never "
                                          r"logs: the retrieval callback logs retrieval/rsynth/mAP_E"):
        trainer.fit(module, datamodule)
    assert trainer.global_step == 0
