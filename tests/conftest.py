"""Test-wide environment: no network, no hub look-ups, W&B offline in a temp dir; shared data."""
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
_WANDB_HOME = tempfile.mkdtemp(prefix="sg-train-wandb-")
for _var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
    os.environ.setdefault(_var, _WANDB_HOME)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()  # otherwise the next WandbLogger would reuse this run


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A tiny synthetic-landmarks data set (GLDv2 layout + a Revisited-format benchmark), made once."""
    from sg_train.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(
        out,
        train_landmarks=12,
        views_per_landmark=6,
        bench_landmarks=4,
        bench_positives=4,
        bench_distractors=10,
        image_size=64,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory):
    """The Revisited-format folder of a tiny synthetic benchmark (dataset ``rsynth``: 6 queries,
    15 database images, 64 px), made once; tests that damage files copy it first."""
    from sg_train.synthetic import generate

    out = tmp_path_factory.mktemp("tiny_benchmark")
    generate(out, train_landmarks=4, views_per_landmark=3, bench_landmarks=3, bench_positives=3,
             bench_distractors=6, r1m_distractors=0, image_size=64, progress=False)
    return out / "revisited"
