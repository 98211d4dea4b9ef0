"""fp32 cosine similarity between embeddings and class weights (sub-centre aware)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["class_cosine"]


def class_cosine(embeddings: Tensor, weight: Tensor, k: int = 1) -> Tensor:
    """``cos θ_j = normalize(e)·normalize(w_j)``, computed in fp32 with autocast off.

    ``weight`` has ``num_classes·k`` rows laid out class-major: rows ``c·k … c·k + k − 1`` are
    the ``k`` sub-centres of class ``c``; the class cosine is the max over its sub-centres.
    Returns a (B, num_classes) fp32 tensor whatever the input dtype or the autocast state.
    """
    if weight.shape[0] % k != 0:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of k={k}")
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        e = F.normalize(embeddings.float(), dim=1)
        w = F.normalize(weight.float(), dim=1)
        cos = F.linear(e, w)
        if k > 1:
            cos = cos.view(cos.shape[0], -1, k).amax(dim=2)
        return cos
