"""Small torch.distributed helpers for losses that need global-batch statistics."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["distributed_world", "gather_padded"]


def distributed_world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is unavailable or not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_padded(values: Tensor, pad_value: float = float("inf")) -> tuple[Tensor, int]:
    """All-gather a detached 1-D tensor whose length may differ between ranks.

    Every rank's tensor is padded with ``pad_value`` to the longest length and the results
    are concatenated in rank order: rank r's values occupy ``[r·n_max, r·n_max + n_r)``.
    Returns ``(gathered, n_max)``; on one process, ``(values, len(values))`` with no copy.
    Costs one small all-gather of the lengths (one host sync) plus the data all-gather.
    """
    values = values.detach()
    rank, world = distributed_world()
    n = values.shape[0]
    if world == 1:
        return values, n
    sizes = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=values.device))
    n_max = int(torch.stack(sizes).max())
    padded = torch.full((n_max,), pad_value, dtype=values.dtype, device=values.device)
    padded[:n] = values
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded.contiguous())
    return torch.cat(chunks), n_max
