"""One source of truth for how pixels are prepared: the model. Training, held-out validation and
retrieval evaluation feed it the same numbers for the same pixels (a backbone whose statistics
are not ImageNet's, and a BGR model)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import train
from callbacks.retrieval_eval import RetrievalEvalCallback

ROOT = Path(__file__).resolve().parents[1]

TINY_NON_IMAGENET = "tf_mobilenetv3_small_minimal_100"  # timm statistics: mean = std = 0.5


def build(tmp_path, data, **model_options):
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["trainer"].update(default_root_dir=str(tmp_path / "run"), max_epochs=1, enable_progress_bar=False, logger=False)
    config["trainer"]["callbacks"][1]["init_args"].update(data_root=str(data / "revisited"), progress=False)
    config["model"].update(backbone=TINY_NON_IMAGENET, head="gem", embedding_dim=16, channels_last=False,
                           model_options=model_options or None)
    config["data"]["init_args"].update(data_root=str(data / "gldv2"), image_size=32, batch_size=4, num_workers=0, val_fraction=0.2)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def pixels_fed_to_the_model(cli, color):
    """The centre pixel of a uniform image of ``color`` (RGB uint8) after the training transform,
    the held-out validation transform and the retrieval benchmark's transform, each (3,) float."""
    trainer, dm = cli.trainer, cli.datamodule
    trainer.strategy.connect(cli.model)
    dm.trainer = trainer
    dm.setup("fit")
    callback = next(cb for cb in trainer.callbacks if isinstance(cb, RetrievalEvalCallback))
    callback.setup(trainer, cli.model, "fit")
    image = np.full((48, 40, 3), color, dtype=np.uint8)
    benchmark = callback._datasets["rsynth"][1]
    out = [dm.train_dataset.transform(image=image)["image"], dm.val_dataset.transform(image=image)["image"],
           benchmark._transform(image=image)["image"]]
    return [np.asarray(t[:, 10, 10], dtype=np.float64) for t in out]


def test_training_validation_and_retrieval_normalise_like_the_model(tmp_path, synthetic_data):
    cli = train.main(["--config", str(build(tmp_path, synthetic_data))], run=False)
    assert cli.model.model.mean == (0.5, 0.5, 0.5)
    expected = (np.array([200, 100, 50]) / 255 - 0.5) / 0.5
    for fed in pixels_fed_to_the_model(cli, (200, 100, 50)):
        np.testing.assert_allclose(fed, expected, rtol=1e-6)


def test_a_bgr_model_gets_bgr_batches_without_a_data_option(tmp_path, synthetic_data):
    config = build(tmp_path, synthetic_data, input_format="bgr")
    cli = train.main(["--config", str(config)], run=False)
    expected = (np.array([50, 100, 200]) / 255 - 0.5) / 0.5  # channels reversed, then normalised
    for fed in pixels_fed_to_the_model(cli, (200, 100, 50)):
        np.testing.assert_allclose(fed, expected, rtol=1e-6)


def test_data_statistics_that_contradict_the_model_are_an_error(tmp_path, synthetic_data):
    config = build(tmp_path, synthetic_data)
    cli = train.main(["--config", str(config), "--data.mean=[0.485,0.456,0.406]"], run=False)
    with pytest.raises(ValueError, match=r"data\.mean=.*contradicts the model's mean \(0\.5, 0\.5, 0\.5\)"):
        cli.trainer.fit(cli.model, cli.datamodule)
