"""Train or fine-tune a landmark retrieval model.

    python train.py fit --config configs/demo.yaml [--trainer.max_epochs=3 ...]
    python train.py fit --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt   # resume
    python train.py validate --config configs/demo.yaml --ckpt_path <ckpt>

The class count (and the per-class image counts for dynamic margins) come from the datamodule.
"""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI at import otherwise

import torch  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from callbacks.finite_loss import FiniteLossGuard  # noqa: E402
from callbacks.skipped_images import SkippedImagesReport  # noqa: E402
from datamodules.gldv2 import GLDv2DataModule  # noqa: E402
from sg_train.module import LandmarkRetrievalModule  # noqa: E402


def _as_list(counts: torch.Tensor) -> list[int]:
    return [int(c) for c in counts.tolist()]


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_counts", "model.class_counts", compute_fn=_as_list, apply_on="instantiate")


def main(args: list[str] | None = None, run: bool = True) -> TrainCLI:
    """Parse ``args`` (default: the command line); with ``run=False`` only build the objects."""
    return TrainCLI(
        LandmarkRetrievalModule,
        GLDv2DataModule,
        trainer_defaults={"callbacks": [FiniteLossGuard(), SkippedImagesReport()]},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the optimizer comes in through the module (model.optimizer)
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
