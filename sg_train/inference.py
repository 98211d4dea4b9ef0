"""Embedding models for evaluation: from an sg-train checkpoint or CVNet weights, with the
SuperGlobal test-time switches (ReLU+, R-GeM, GeM+, S-GeM) applied on top."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sg_train.backbone import WeightsFileError
from sg_train.cvnet import load_cvnet_weights
from sg_train.finetune import MODEL_PREFIX, check_exact_fit, read_lightning_checkpoint, split_state_dict
from sg_train.model import EmbeddingModel
from sg_train.pooling.head import HeadSpec, parse_head_spec

log = logging.getLogger(__name__)

# Parameters a test-time head switch may leave unused (GeM's p once the pooling is GeM+).
SWITCHABLE_KEYS = frozenset({"head.pool.p"})


def superglobal_head(base: str, *, rgem: bool = False, gemp: bool = False, sgem: bool = False) -> str:
    """``base`` with the SuperGlobal switches turned on (never off): ``rgem`` adds Regional-GeM,
    ``gemp`` makes the pooling GeM+, ``sgem`` adds Scale-GeM. E.g. ``gem`` → ``rgem+gemp+sgem``."""
    spec = parse_head_spec(base)
    return str(
        HeadSpec(
            pooling="gemp" if gemp else spec.pooling,
            regional=spec.regional or rgem,
            scale_gem=spec.scale_gem or sgem,
        )
    )


def model_from_checkpoint(
    path: str | Path,
    *,
    rgem: bool = False,
    gemp: bool = False,
    sgem: bool = False,
    relu_plus: bool = False,
    scales: Sequence[float] | None = None,
) -> EmbeddingModel:
    """The :class:`EmbeddingModel` of an sg-train checkpoint, in eval mode.

    The architecture comes from the checkpoint's hyper-parameters; every weight must fit exactly
    (a checkpoint without the expected keys is refused, naming them). Switches only add
    SuperGlobal components; with ``gemp`` a trained GeM p is left unused. Raises
    FileNotFoundError, and :class:`~sg_train.backbone.WeightsFileError` for a file that cannot be
    read or lacks the sg-train hyper-parameters.
    """
    checkpoint = read_lightning_checkpoint(path)
    hparams: dict[str, Any] = dict(checkpoint.get("hyper_parameters") or {})
    missing = [key for key in ("backbone", "head", "embedding_dim") if key not in hparams]
    if missing:
        raise WeightsFileError(
            f"{path} has no sg-train hyper-parameters {missing}; was it written by train.py? "
            "(CVNet weights go to --cvnet-weights)"
        )
    options = dict(hparams.get("model_options") or {})
    if scales is not None:
        options["scales"] = tuple(scales)
    model = EmbeddingModel(
        backbone=hparams["backbone"],
        head=superglobal_head(hparams["head"], rgem=rgem, gemp=gemp, sgem=sgem),
        embedding_dim=hparams["embedding_dim"],
        relu_plus=relu_plus or bool(hparams.get("relu_plus")),
        **options,
    )
    state = split_state_dict(checkpoint["state_dict"], MODEL_PREFIX)
    unused = {key: state.pop(key) for key in SWITCHABLE_KEYS & set(state) if key not in model.state_dict()}
    check_exact_fit(model, state, f"checkpoint {path}")
    model.load_state_dict(state)
    if unused:
        log.info("%s: %s not used by the head %s", path, sorted(unused), model.head.spec)
    return model.eval()


def model_from_cvnet(
    path: str | Path,
    depth: int,
    *,
    rgem: bool = False,
    gemp: bool = False,
    sgem: bool = False,
    relu_plus: bool = False,
    scales: Sequence[float] | None = None,
) -> EmbeddingModel:
    """CVNet's global model (what SuperGlobal evaluates) with the SuperGlobal switches."""
    options: dict[str, Any] = {"head": superglobal_head("gem", rgem=rgem, gemp=gemp, sgem=sgem), "relu_plus": relu_plus}
    if scales is not None:
        options["scales"] = tuple(scales)
    return load_cvnet_weights(path, depth, **options)
