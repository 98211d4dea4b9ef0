"""The environment for a train.py/probe subprocess started by a test."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# DDP variables of an enclosing launcher would make the child join it; WANDB_SERVICE is set by wandb
# in this (pytest) process once a test has used W&B in-process: a child inheriting it would share
# this process's wandb-core, where a killed child's run stays open ("run ID ... is in use").
_NOT_INHERITED = {"MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "WANDB_SERVICE"}


def child_env() -> dict[str, str]:
    """``os.environ`` without the variables above, the repository and tests/ on PYTHONPATH, one OpenMP thread."""
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), OMP_NUM_THREADS="1")
    return env
