"""CFCD stage 2 end to end on generated data: a stage-1 checkpoint, its mined hard negatives, a
2-step stage-2 fit on tuples with the local triplet loss logged, and the refusals before the first step."""
from __future__ import annotations

import math

import pytest
import wandb

import train
import wandb_records
from sg_train import mine_hard_negatives
from sg_train.errors import OptionError
from sg_train.hard_negatives import HardNegativesError
from test_runs import demo_config


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, synthetic_data):
    """(stage-1 config, its last.ckpt, the hard negatives mined with it)."""
    root = tmp_path_factory.mktemp("stage1")
    config = demo_config(root, synthetic_data, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    train.main(["fit", "--config", str(config)])
    wandb.finish()  # a fixture: the per-test finish comes too late, the next WandbLogger would reuse the run
    checkpoint = root / "run" / "checkpoints" / "last.ckpt"
    mined = root / "hard_negatives"
    # the run folder's config.yaml, as the README says (it holds the fit command's ckpt_path too)
    assert mine_hard_negatives.main(["--config", str(root / "run" / "config.yaml"), "--checkpoint", str(checkpoint),
                                     "--out", str(mined),
                                     "--top-n", "3", "--num-workers", "0", "--no-progress"]) == 0
    return config, checkpoint, mined


def stage2_args(config, checkpoint, mined, **changes):
    args = {"model.init_from": checkpoint, "model.class_transfer": "landmark_id", "model.local_triplet_weight": 0.5,
            "data.init_args.hard_negatives": mined, "data.init_args.tuples_per_batch": 2,
            "data.init_args.negatives_per_tuple": 2, "trainer.max_steps": 2, "trainer.max_epochs": 1,
            "trainer.limit_val_batches": 0, "trainer.limit_train_batches": 2, **changes}
    return ["fit", "--config", str(config)] + [f"--{k}={v}" for k, v in args.items() if v is not None]


def test_a_two_step_stage_two_fit_logs_the_local_triplet_loss(stage1, tmp_path):
    config, checkpoint, mined = stage1
    train.main(stage2_args(config, checkpoint, mined, **{"trainer.default_root_dir": tmp_path / "s2"}))
    rows = wandb_records.history(wandb_records.run_file(tmp_path / "s2" / "wandb"))
    steps = [row for row in rows if "train/local_triplet" in row]
    assert len(steps) == 2
    for row in steps:
        assert row["train/local_triplet_weight"] == 0.5
        assert row["train/local_triplet"] >= 0 and math.isfinite(row["train/loss"])
        assert 0 <= row["train/matches_per_tuple"]
        assert 0 <= row.get("train/active_triplets", 0) <= 1


def test_stage_two_refuses_what_would_make_it_useless_before_the_first_step(stage1, tmp_path, synthetic_data):
    config, checkpoint, mined = stage1
    run = {"trainer.default_root_dir": tmp_path / "run"}
    with pytest.raises(OptionError, match="needs both model.local_triplet_weight > 0 and data.hard_negatives"):
        train.main(stage2_args(config, checkpoint, mined, **run, **{"data.init_args.hard_negatives": None}))
    with pytest.raises(OptionError, match="needs both"):
        train.main(stage2_args(config, checkpoint, mined, **{"trainer.default_root_dir": tmp_path / "run2",
                                                             "model.local_triplet_weight": 0.0}))
    other = tmp_path / "other"  # another stage-1 model: its weights differ from the mined one's
    other.mkdir()
    other_config = demo_config(other, synthetic_data, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    train.main(["fit", "--config", str(other_config)])
    wandb.finish()
    with pytest.raises(HardNegativesError, match="another model"):
        train.main(stage2_args(config, other / "run" / "checkpoints" / "last.ckpt", mined,
                               **{"trainer.default_root_dir": tmp_path / "run3"}))
    with pytest.raises(HardNegativesError):
        train.main(stage2_args(config, checkpoint, tmp_path / "missing", **{"trainer.default_root_dir": tmp_path / "r4"}))
