"""Every shipped config parses and builds (on CPU, pointed at generated data)."""
from __future__ import annotations

from pathlib import Path

import pytest

import train
from callbacks.retrieval_eval import RetrievalEvalCallback
from sg_train.losses import CurricularFace
from sg_train.synthetic.class_folders import generate_class_folders

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def data_arguments(config: Path, synthetic_data: Path, tmp_path: Path) -> list[str]:
    """Point a config at generated data: GLDv2 + the Revisited benchmark, or a folder of photos."""
    if config.stem == "finetune_folder":
        generate_class_folders(tmp_path / "My Photos", landmarks=3, views=5, image_size=64, progress=False)
        return [f"--data.images={tmp_path / 'My Photos'}"]
    return [f"--data.data_root={synthetic_data / 'gldv2'}", "--data.csv=train.csv",
            f"--trainer.callbacks.init_args.data_root={synthetic_data / 'revisited'}",
            "--trainer.callbacks.init_args.datasets=[rsynth]"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_builds_on_cpu(config, synthetic_data, tmp_path):
    cli = train.main(
        [
            "--config", str(config), *data_arguments(config, synthetic_data, tmp_path), "--data.num_workers=0",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true",
            "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path / 'run'}",
        ],
        run=False,
    )
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes
    assert any(isinstance(c, RetrievalEvalCallback) for c in cli.trainer.callbacks)
    assert cli.trainer.checkpoint_callback.monitor.startswith("retrieval/")

    if config.stem == "gldv2_r50_superglobal":
        model = cli.model.model
        assert type(model.backbone).__name__ == "ResNet" and model.fc.out_features == 2048
        assert isinstance(cli.model.loss_fn, CurricularFace)
        assert (cli.model.loss_fn.s, cli.model.loss_fn.m) == (30.0, 0.15)
    if config.stem == "finetune_folder":
        assert cli.model.class_names == cli.datamodule.class_names == sorted(p.name for p in (tmp_path / "My Photos").iterdir()
                                                                            if not p.name.startswith("."))
        assert cli.model.hparams.backbone_lr_mult == 0.1
