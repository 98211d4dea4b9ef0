"""Ablation on the synthetic landmarks: ArcFace, MadaCos, and MadaCos + CFCD stage 2, same budget and seed.

The demo's backbone and data (``configs/demo.yaml``: resnet18 from scratch, 96 px, 64 images per
step, seed 0), each run a fresh ``train.py fit`` (W&B off), then one table of the synthetic
benchmark's E/M/H mAP with and without SuperGlobal reranking (the retrieval callback's final
evaluation, protocol and scales as the demo's):

- ``arcface``: the demo as it is (``--epochs`` epochs).
- ``madacos``: the same with MadaCos (ρ = 0.02, CFCD's) instead of ArcFace.
- ``madacos + stage 2``: MadaCos for the first ``epochs - stage2_epochs`` epochs (its own schedule),
  hard negatives mined with that checkpoint (``python -m sg_train.mine_hard_negatives``), then CFCD
  stage 2 from it for as many steps of 64 images (8 tuples of 8) as ``stage2_epochs`` demo epochs
  hold: the same number of training images as the other two (mining, one forward pass, not counted).

The last line is ``ratio=<stage 2 / madacos Medium mAP, reranked>``. Takes about 20 minutes on 2 CPU cores;
called again with the same ``--out`` it reuses the runs that finished (their times as measured then).

    python bench/ablation_synthetic.py [--data data/synthetic] [--out runs/ablation] [--epochs 6]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sg_train.retrieval import format_results_table  # noqa: E402

MADACOS = ["--model.loss=madacos", "--model.loss_options={rho: 0.02}"]


def run(command: list[str], log: Path) -> float:
    """Run ``command`` from the repository root with W&B off; its output goes to ``log``. Returns seconds."""
    env = {**os.environ, "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"ablation: {' '.join(command[:4])} ... failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def fit(out: Path, name: str, data: Path, epochs: int, extra: list[str]) -> tuple[dict, float]:
    """A demo fit in ``out/name``; ``(its last retrieval result of the benchmark, seconds)``."""
    folder = out / name.replace(" ", "_").replace("+", "plus")
    if (folder / "results.json").is_file() and (folder / "log.seconds").is_file():  # finished by an earlier call
        results = json.loads((folder / "results.json").read_text())
        return results["trained"]["per_dataset"]["rsynth"], float((folder / "log.seconds").read_text())
    seconds = run([sys.executable, "train.py", "fit", "--config", "configs/demo.yaml",
                   f"--trainer.default_root_dir={folder}", f"--trainer.max_epochs={epochs}",
                   f"--data.init_args.data_root={data / 'gldv2'}",
                   f"--trainer.callbacks.init_args.data_root={data / 'revisited'}",
                   "--trainer.callbacks.init_args.evaluate_before_training=false",
                   "--trainer.callbacks.init_args.examples=0", *extra], out / f"{folder.name}.log")
    (folder / "log.seconds").write_text(f"{seconds:.1f}\n")
    results = json.loads((folder / "results.json").read_text())
    return results["trained"]["per_dataset"]["rsynth"], seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic", help="python -m sg_train.synthetic output")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation", help="a new folder for the runs")
    parser.add_argument("--epochs", type=int, default=6, help="the budget, in demo epochs (default 6, the demo's)")
    parser.add_argument("--stage2-epochs", type=int, default=2, help="of which stage 2 (default 2)")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="demo steps per epoch (default: read from the arcface run's checkpoint)")
    args = parser.parse_args(argv)
    if not (0 < args.stage2_epochs < args.epochs):
        parser.error(f"--stage2-epochs must lie in [1, --epochs - 1], got {args.stage2_epochs}")
    if not (args.data / "gldv2").is_dir():
        parser.error(f"{args.data} holds no synthetic data: python -m sg_train.synthetic --out {args.data}")
    args.out.mkdir(parents=True, exist_ok=True)  # a run finished by an earlier call is reused, not redone

    results, seconds = {}, {}
    results["arcface"], seconds["arcface"] = fit(args.out, "arcface", args.data, args.epochs, [])
    results["madacos"], seconds["madacos"] = fit(args.out, "madacos", args.data, args.epochs, MADACOS)

    stage1_epochs = args.epochs - args.stage2_epochs
    _, seconds["stage 1"] = fit(args.out, "stage 1", args.data, stage1_epochs, MADACOS)
    stage1 = args.out / "stage_1"
    mined = stage1 / "hard_negatives"
    seconds["mining"] = float((mined / "mining.seconds").read_text()) if (mined / "mining.seconds").is_file() else run([sys.executable, "-m", "sg_train.mine_hard_negatives", "--config", str(stage1 / "config.yaml"),
                             "--checkpoint", str(stage1 / "checkpoints" / "last.ckpt"), "--out", str(mined),
                             "--no-progress"], args.out / "mining.log")
    (mined / "mining.seconds").write_text(f"{seconds['mining']:.1f}\n")
    import torch  # noqa: PLC0415 - only to read the step count

    steps = args.steps_per_epoch or torch.load(stage1 / "checkpoints" / "last.ckpt", map_location="cpu",
                                               weights_only=False)["global_step"] // stage1_epochs
    stage2 = ["--model.init_from=" + str(stage1 / "checkpoints" / "last.ckpt"), "--model.class_transfer=landmark_id",
              "--model.local_triplet_weight=2.0", "--model.warmup=0", f"--data.init_args.hard_negatives={mined}",
              "--data.init_args.tuples_per_batch=8", "--data.init_args.negatives_per_tuple=6",
              f"--trainer.limit_train_batches={steps * args.stage2_epochs}"]
    results["madacos + stage 2"], seconds["stage 2"] = fit(args.out, "madacos + stage 2", args.data, 1, MADACOS + stage2)

    print(f"budget: {args.epochs} demo epochs of {steps} steps x 64 images, seed 0 "
          f"(stage 2: {stage1_epochs} MadaCos epochs + {steps * args.stage2_epochs} steps of 8 tuples x 8 images)")
    print(format_results_table(results))
    print("seconds: " + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items())
          + f"; total {sum(seconds.values()):.0f}")
    print(f"ratio={results['madacos + stage 2']['rerank_mAP']['M'] / results['madacos']['rerank_mAP']['M']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
