"""Subprocess helper for tests/test_r1m.py: extract R1M descriptors and SIGKILL this process as
soon as chunk 0 is recorded (a hard interruption: no exception, no clean-up).

    python tests/r1m_kill_probe.py R1M_ROOT OUT_DIR WEIGHTS CHUNK_SIZE
"""
from __future__ import annotations

import os
import signal
import sys

import torch

from datamodules.r1m import R1MDataset
from sg_train.model import EmbeddingModel
from sg_train.r1m_extraction import extract_r1m

MAX_SIZE = 40
BATCH_SIZE = 5


def build_model(weights: str | None = None) -> EmbeddingModel:
    """The model both the probe and the test use (weights from a file, so both are identical)."""
    model = EmbeddingModel("resnet18", head="gem", embedding_dim=16)
    if weights is not None:
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model


def dataset(root: str, model: EmbeddingModel) -> R1MDataset:
    return R1MDataset(root, mean=model.mean, std=model.std, input_format=model.input_format, max_size=MAX_SIZE)


def kill_after_first_chunk(chunk: int) -> None:
    if chunk == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    root, out_dir, weights, chunk_size = sys.argv[1:5]
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # as tests/conftest.py: same kernels, same bits
    model = build_model(weights)
    extract_r1m(model, dataset(root, model), out_dir, chunk_size=int(chunk_size), batch_size=BATCH_SIZE,
                progress=False, on_chunk_done=kill_after_first_chunk)
    sys.exit("the probe was not killed")


if __name__ == "__main__":
    main()
