"""End to end through train.py: a trained checkpoint fine-tuned on a folder of new landmarks."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

import train
from sg_train.synthetic.class_folders import generate_class_folders
from test_runs import demo_config

ROOT = Path(__file__).resolve().parents[1]


def finetune_config(tmp_path: Path, photos: Path, init_from: Path, **trainer_changes) -> Path:
    """configs/finetune_folder.yaml made small: the demo test model (resnet18, 32-d) at 64 px."""
    config = yaml.safe_load((ROOT / "configs" / "finetune_folder.yaml").read_text())
    config["trainer"].update({"default_root_dir": str(tmp_path / "finetune"), "enable_progress_bar": False,
                              **trainer_changes})
    config["trainer"]["callbacks"][0]["init_args"]["unfreeze_at_epoch"] = 1
    retrieval = config["trainer"]["callbacks"][-1]["init_args"]
    retrieval.update(batch_size=16, progress=False, M=6, K=2)
    # the shipped lr (0.001, backbone 0.1x) suits a well-trained start (the demo's); this test's start
    # is two short epochs on 12 landmarks, which needs 0.01 (backbone 0.3x) to move in 25 steps
    config["model"].update(embedding_dim=32, init_from=str(init_from), backbone_lr_mult=0.3)
    config["model"]["optimizer"]["init_args"]["lr"] = 0.01
    config["data"]["init_args"].update(images=str(photos), image_size=64, batch_size=8, num_workers=0, val_fraction=0.4)
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def test_finetuning_on_new_landmarks_raises_held_out_retrieval(tmp_path, synthetic_data):
    (tmp_path / "base").mkdir()
    train.main(["fit", "--config", str(demo_config(tmp_path / "base", synthetic_data, max_epochs=2))])
    start = tmp_path / "base" / "run" / "checkpoints" / "last.ckpt"
    photos = tmp_path / "My Photos"
    generate_class_folders(photos, landmarks=6, views=12, image_size=64, progress=False)

    cli = train.main(["fit", "--config", str(finetune_config(tmp_path, photos, start, max_epochs=5))])

    run = tmp_path / "finetune"
    results = json.loads((run / "results.json").read_text())
    before = results["before_training"]["per_dataset"]["held_out"]["metrics"]
    after = results["trained"]["per_dataset"]["held_out"]["metrics"]
    print("held-out before", before, "after", after)
    assert after["mAP@5"] > before["mAP@5"] and after["MAP@R"] > before["MAP@R"]
    assert before["num_queries_scored"] == after["num_queries_scored"] == 30  # 5 held out of each class of 12
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["sg_train"]["class_names"] == sorted(p.name for p in photos.iterdir() if not p.name.startswith("."))
    assert cli.model.finetune_report["source"] == "sg-train"
    assert "the checkpoint has no class names" in cli.model.finetune_report["class_weights"]  # a GLDv2 run
    assert "retrieval/held_out/rerank_MAP@R" in cli.trainer.callback_metrics
