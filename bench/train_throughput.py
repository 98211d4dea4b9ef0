"""Training throughput: the Lightning fit (as train.py runs it) against a bare PyTorch loop.

Same model, loss, optimizer groups, LR schedule, data pipeline and batch size; the two are run
alternately (``--rounds`` times each) and the median images/s of each is compared. Warm-up steps
are not timed. The last line is ``ratio=<lightning/bare>`` (target >= 0.95).

    python bench/train_throughput.py [--data-root data/synthetic/gldv2] [--steps 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from callbacks.finite_loss import FiniteLossGuard  # noqa: E402
from callbacks.skipped_images import SkippedImagesReport  # noqa: E402
from datamodules.gldv2 import GLDv2DataModule  # noqa: E402
from sg_train.module import LandmarkRetrievalModule  # noqa: E402


class StepClock(Callback):
    """Wall time from the end of the warm-up steps to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0
        self.images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.images += batch["label"].shape[0]
            self.end = time.perf_counter()


def build(args: argparse.Namespace) -> tuple[GLDv2DataModule, LandmarkRetrievalModule]:
    datamodule = GLDv2DataModule(
        data_root=args.data_root, csv="train.csv", val_fraction=0.0, image_size=args.image_size,
        batch_size=args.batch_size, num_workers=args.num_workers, persistent_workers=args.num_workers > 0,
    )
    module = LandmarkRetrievalModule(
        num_classes=datamodule.num_classes, backbone=args.backbone, head="gem", embedding_dim=128,
        loss="arcface", loss_options={"s": 20.0, "m": 0.1},
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=2e-3, weight_decay=1e-4), warmup=0.1,
    )
    return datamodule, module


def lightning_images_per_second(args: argparse.Namespace) -> float:
    datamodule, module = build(args)
    clock = StepClock(args.warmup)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[FiniteLossGuard(), SkippedImagesReport(), clock], default_root_dir=args.work_dir,
    )
    trainer.fit(module, datamodule)
    return clock.images / (clock.end - clock.start)


def bare_images_per_second(args: argparse.Namespace) -> float:
    """The same step with no framework: forward, margin loss, backward, optimizer and LR step."""
    datamodule, module = build(args)
    datamodule.setup("fit")
    module.train()
    optimizer_and_schedule = module.build_optimizer(total_steps=args.warmup + args.steps)
    optimizer, scheduler = optimizer_and_schedule["optimizer"], optimizer_and_schedule["lr_scheduler"]["scheduler"]
    step, images, start = 0, 0, 0.0
    while step < args.warmup + args.steps:
        for batch in datamodule.train_dataloader():
            output = module.loss_fn(module.model(batch["image"]), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == args.warmup:
                start = time.perf_counter()
            elif step > args.warmup:
                images += batch["label"].shape[0]
            if step == args.warmup + args.steps:
                break
    return images / (time.perf_counter() - start)


def ensure_data(data_root: str | None, work_dir: str) -> str:
    if data_root:
        return data_root
    from sg_train.synthetic import generate

    out = Path(work_dir) / "synthetic"
    generate(out, train_landmarks=60, views_per_landmark=8, bench_landmarks=2, bench_distractors=4, progress=False)
    return str(out / "gldv2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="a GLDv2-layout folder with train.csv (default: generate a small synthetic set)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternating")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sg-train-bench-") as work_dir:
        args.work_dir = work_dir
        args.data_root = ensure_data(args.data_root, work_dir)
        lightning, bare = [], []
        for round_index in range(args.rounds):
            lightning.append(lightning_images_per_second(args))
            bare.append(bare_images_per_second(args))
            print(f"round {round_index + 1}: lightning {lightning[-1]:7.1f} img/s   bare {bare[-1]:7.1f} img/s", flush=True)
    lightning_median, bare_median = statistics.median(lightning), statistics.median(bare)
    print(f"{args.backbone} {args.image_size}px batch {args.batch_size}, {args.steps} timed steps x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"median images/s: lightning {lightning_median:.1f}, bare PyTorch {bare_median:.1f}")
    print(f"ratio={lightning_median / bare_median:.3f}")


if __name__ == "__main__":
    main()
