"""ReLU+ (SuperGlobal): ``clamp(x, min=alpha)`` in place of some ReLUs of a ResNet, alpha = 0.014.

Placement, as in the published SuperGlobal ResNet (``model/resnet.py`` of
ShihaoShao-GH/SuperGlobal, where a ``relup(alpha)`` module is ``x.clamp(alpha)``):

- the activation after the residual sum (the block output) of every block of stages 1-3
  (timm: ``layer1..layer3``, ``act3`` of a Bottleneck / ``act2`` of a BasicBlock);
- the inner activations of every stage-1 block (timm ``layer1``: ``act1``/``act2`` of a
  Bottleneck, ``act1`` of a BasicBlock);
- stage 4 (``layer4``) and the stem keep a plain ReLU.

The published code only has bottleneck ResNets; for basic-block ResNets (resnet18/34) the
same rule is applied to their two activations. The clamp passes gradients where x > alpha
(like ReLU above 0), so the patched model trains as well as it evaluates.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import OptionError

__all__ = ["ReLUPlus", "ReLUPlusBackboneError", "apply_relu_plus", "RELU_PLUS_ALPHA"]

RELU_PLUS_ALPHA = 0.014


class ReLUPlusBackboneError(OptionError, TypeError):
    """``relu_plus`` asked of a backbone ReLU+ cannot patch (a TypeError too, as it always was)."""


class ReLUPlus(nn.Module):
    """``max(x, alpha)``: a ReLU whose floor is alpha instead of 0."""

    def __init__(self, alpha: float = RELU_PLUS_ALPHA) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x, min=self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"{arch} ({type(model).__name__})" if arch else type(model).__name__


def _block_activations(block: nn.Module) -> tuple[list[str], str] | None:
    """(inner activation names, output activation name) of a timm ResNet block, or None."""
    from timm.models.resnet import BasicBlock, Bottleneck

    if isinstance(block, Bottleneck):
        return ["act1", "act2"], "act3"
    if isinstance(block, BasicBlock):
        return ["act1"], "act2"
    return None


def apply_relu_plus(model: nn.Module, alpha: float = RELU_PLUS_ALPHA) -> list[str]:
    """Patch a timm ResNet in place with ReLU+ (placement above); return the patched names.

    Raises :class:`ReLUPlusBackboneError` (a TypeError and an
    :class:`~sg_train.errors.OptionError`) naming the model when it is not a timm ResNet built
    from Bottleneck / BasicBlock blocks whose patched activations are ReLUs (or ReLU+ already:
    re-applying only changes alpha); OptionError for a negative alpha.
    """
    from timm.models.resnet import ResNet

    name = _model_name(model)
    if not isinstance(model, ResNet):
        raise ReLUPlusBackboneError(
            f"ReLU+ can only patch timm ResNets (resnet*, resnext*, seresnet*, ...); backbone {name} is not one"
        )
    if alpha < 0:
        raise OptionError(f"ReLU+ alpha must be >= 0, got {alpha}")
    patched: list[str] = []
    for stage in (1, 2, 3):
        layer = getattr(model, f"layer{stage}")
        for idx, block in enumerate(layer):
            acts = _block_activations(block)
            if acts is None:
                raise ReLUPlusBackboneError(
                    f"ReLU+ cannot patch backbone {name}: layer{stage}.{idx} is a {type(block).__name__}, "
                    "not a timm Bottleneck/BasicBlock"
                )
            inner, output = acts
            targets = ([*inner] if stage == 1 else []) + [output]
            for attr in targets:
                act = getattr(block, attr)
                if not isinstance(act, (nn.ReLU, ReLUPlus)):
                    raise ReLUPlusBackboneError(
                        f"ReLU+ cannot patch backbone {name}: layer{stage}.{idx}.{attr} is "
                        f"{type(act).__name__}, not a ReLU"
                    )
                setattr(block, attr, ReLUPlus(alpha))
                patched.append(f"layer{stage}.{idx}.{attr}")
    return patched
