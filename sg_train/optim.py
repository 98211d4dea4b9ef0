"""Optimizer parameter groups and the per-iteration warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .errors import OptionError


def parameter_groups(
    named_groups: dict[str, tuple[Iterable[tuple[str, nn.Parameter]], float]],
) -> list[dict]:
    """Split each named part of a model into a decayed and a non-decayed optimizer group.

    ``named_groups`` maps a group name (e.g. ``"backbone"``) to ``(named_parameters, lr_mult)``.
    Each returned group carries ``name``, ``params``, ``lr_mult`` and, for the non-decayed half,
    ``weight_decay=0.0`` (overriding the optimizer's default). Non-decayed are the 0-d and 1-d
    tensors: biases, norm scales/shifts and GeM's p (every weight matrix and conv kernel has
    ndim >= 2). Frozen parameters are left out; empty groups are dropped.
    """
    groups: list[dict] = []
    for group_name, (named_params, lr_mult) in named_groups.items():
        decay, keep = [], []
        for _, param in named_params:
            if not param.requires_grad:
                continue
            (keep if param.ndim <= 1 else decay).append(param)
        if decay:
            groups.append({"name": group_name, "params": decay, "lr_mult": lr_mult})
        if keep:
            groups.append(
                {"name": f"{group_name}_no_decay", "params": keep, "lr_mult": lr_mult, "weight_decay": 0.0}
            )
    return groups


def apply_lr_multipliers(optimizer: torch.optim.Optimizer) -> None:
    """Scale each group's learning rate by its ``lr_mult`` (call once, before building a scheduler)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_mult", 1.0)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier at optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then a cosine
    from 1 down to ``min_lr_ratio`` at ``total_steps``:
    ``r + (1 - r) * (1 + cos(pi * t)) / 2`` with ``t = (step - warmup) / (total - warmup)`` clipped to [0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_warmup_steps(warmup: float, total_steps: int) -> int:
    """Warm-up length in optimizer steps: ``warmup`` < 1 is a fraction of the run, >= 1 a step count.

    ``total_steps`` is the run's number of optimizer steps. Raises
    :class:`~sg_train.errors.OptionError` (a ValueError), naming
    ``model.warmup`` and the fix, for a negative or non-finite ``warmup``, a step count that is
    not a whole number, or one longer than the run; and for a run of no steps at all.
    """
    if total_steps <= 0:
        raise OptionError(
            f"the run has {total_steps} optimizer steps, so there is nothing to train: set trainer.max_epochs "
            "or trainer.max_steps above 0 and give the training set at least one full batch"
        )
    if not (math.isfinite(warmup) and warmup >= 0):
        raise OptionError(
            f"model.warmup must be >= 0 (a fraction of the run below 1, or a step count), got {warmup}; "
            "e.g. write warmup: 0.05"
        )
    if warmup < 1:
        return int(round(warmup * total_steps))
    if warmup != int(warmup):
        raise OptionError(
            f"model.warmup = {warmup} is neither a fraction of the run (< 1) nor a whole number of steps; "
            f"write warmup: {int(warmup)} (steps) or a fraction such as 0.05"
        )
    if warmup > total_steps:
        raise OptionError(
            f"model.warmup = {int(warmup)} steps is longer than the run, which has {total_steps} optimizer steps; "
            f"write a fraction of the run below 1 (e.g. warmup: 0.05) or at most {total_steps} steps"
        )
    return int(warmup)


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping :func:`warmup_cosine_factor` once per optimizer step."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise OptionError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_lr_ratio)
    )
