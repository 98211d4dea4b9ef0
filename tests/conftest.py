"""Test-wide environment: no network, no hub look-ups, W&B offline in a temp dir; shared data."""
import atexit
import os
import shutil
import sys
import tempfile

# Forced, not os.environ.setdefault: the tests read the offline run files W&B writes into their
# temp folders, so nothing from the calling shell may change that. Every inherited WANDB_* goes
# (WANDB_MODE=online/disabled, WANDB_DIR, WANDB_CONFIG_DIR and the settings file in it,
# WANDB_RUN_ID / WANDB_RESUME, WANDB_SERVICE: a wandb-core owned by another process, which
# wandb.teardown() would then not wait for, see wandb_records.run_file).
for _var in [v for v in os.environ if v.startswith("WANDB_")]:
    del os.environ[_var]
_WANDB_HOME = tempfile.mkdtemp(prefix="sg-train-wandb-")
# W&B stages a copy of every artifact file here (checkpoints: ~130 MB each); a home left behind
# by every session filled the CI disk.
atexit.register(shutil.rmtree, _WANDB_HOME, ignore_errors=True)
os.environ.update(
    HF_HUB_OFFLINE="1",
    NO_ALBUMENTATIONS_UPDATE="1",
    WANDB_MODE="offline",
    WANDB_SILENT="true",
    # OpenMP threads sleep instead of spinning while they wait: on a machine shared with other
    # processes (CI, DDP children, DataLoader workers) spinning threads starve each other.
    OMP_WAIT_POLICY="PASSIVE",
    **dict.fromkeys(("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"), _WANDB_HOME),
)

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
    if wandb is not None:
        from wandb.sdk import wandb_setup

        # W&B reads WANDB_* once per process (its setup singleton) and ignores later changes: a test
        # that set WANDB_MODE=disabled (monkeypatch, since restored) would leave W&B off for the rest.
        if wandb_setup.singleton().did_environment_change():
            wandb.teardown()


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


@pytest.fixture
def files(tmp_path):
    """Descriptor-mode input of evaluate.py: ``{"gnd", "Q", "X"}`` paths of a generated 12-query,
    400-image benchmark (``gnd_toyford.pkl``, fp32 queries, fp16 database)."""
    import pickle

    import numpy as np
    from test_retrieval_reference import clustered_descriptors, random_gnd

    rng = np.random.default_rng(0)
    gnd = random_gnd(12, 400, rng, sizes=((3, 25), (3, 25), (2, 20)))
    Q, X = clustered_descriptors(gnd, 32, rng, noise=3.0)
    paths = {"gnd": tmp_path / "gnd_toyford.pkl", "Q": tmp_path / "Q.npy", "X": tmp_path / "X.npy"}
    paths["gnd"].write_bytes(pickle.dumps(gnd))
    np.save(paths["Q"], Q.numpy())
    np.save(paths["X"], X.numpy().astype(np.float16))
    return paths


@pytest.fixture
def wandb_env(monkeypatch):
    """``wandb_env(WANDB_RUN_ID="x", ...)`` sets W&B variables for this test as a fresh process would
    see them: W&B reads WANDB_* once per process (its setup singleton) and ignores later changes, so
    the singleton goes too (in a test run after others, a W&B run would otherwise not see them)."""
    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        wandb = sys.modules.get("wandb")
        if wandb is not None:
            wandb.teardown()

    return set_env
