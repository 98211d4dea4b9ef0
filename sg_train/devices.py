"""The torch device a command line names (``--device``), checked before any work."""
from __future__ import annotations

import torch

from .errors import OptionError

__all__ = ["resolve_device"]


def resolve_device(name: str | None, *, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``name`` as a :class:`torch.device`: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; None is cuda when
    one is available, else cpu. Under torchrun (``world_size > 1``) a bare ``"cuda"`` is
    ``cuda:<local_rank>``.

    Raises :class:`~sg_train.errors.OptionError` naming ``--device`` for a name that is not a device,
    another device type, CUDA on a machine without it, or a CUDA index beyond the devices here
    (torch's own errors come later, as a traceback from inside the model).
    """
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {name}: this machine has no CUDA device; use --device cpu")
        if device.index is None and world_size > 1:
            device = torch.device("cuda", local_rank)
        if (device.index or 0) >= torch.cuda.device_count():
            raise OptionError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices here")
    elif device.type != "cpu":
        raise OptionError(f"--device {name!r}: use cpu or cuda")
    return device
