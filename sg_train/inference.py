"""Embedding models for evaluation: from an sg-train checkpoint or CVNet weights, with the
SuperGlobal test-time switches (ReLU+, R-GeM, GeM+, S-GeM) applied on top."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sg_train.cvnet import load_cvnet_weights
from sg_train.model import CONFIG_KEYS, EmbeddingModel, model_config_arguments
from sg_train.pooling.head import HeadSpec, parse_head_spec
from sg_train.weights_io import (
    MODEL_PREFIX,
    WeightsFileError,
    check_exact_fit,
    read_lightning_checkpoint,
    split_state_dict,
    stored_model_config,
)

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


def _arguments_from_hyperparameters(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The constructor arguments of a checkpoint written before sg-train stored its model
    configuration: the module's hyper-parameters, today's defaults for everything they omit."""
    hparams: dict[str, Any] = dict(checkpoint.get("hyper_parameters") or {})
    missing = [key for key in ("backbone", "head", "embedding_dim") if key not in hparams]
    if missing:
        raise WeightsFileError(
            f"{path} has no sg-train hyper-parameters {missing}; was it written by train.py? "
            "(CVNet weights go to --cvnet-weights)"
        )
    options = dict(hparams.get("model_options") or {})
    unknown = sorted(set(options) - set(CONFIG_KEYS))
    if unknown:
        raise WeightsFileError(
            f"{path}: its hyper-parameter model_options {unknown} are no EmbeddingModel arguments of this "
            f"sg-train version (they are {list(CONFIG_KEYS)}); rebuild it with the sg-train version that wrote it"
        )
    warnings.warn(
        f"{path} stores no model configuration (written before sg-train stored one): the model is rebuilt "
        "from its hyper-parameters with today's defaults for every value they do not name (GeM+ p, R-GeM p "
        "and kernel, Scale-GeM mode and p, ReLU+ alpha, extraction scales, preprocessing); if a default "
        "changed since it was trained, its descriptors differ from the trained model's",
        stacklevel=3,
    )
    return {
        "backbone": hparams["backbone"],
        "head": hparams["head"],
        "embedding_dim": hparams["embedding_dim"],
        "relu_plus": bool(hparams.get("relu_plus")),
        **options,
    }


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

    The model is rebuilt from the configuration the checkpoint stores
    (:meth:`EmbeddingModel.from_config`), so today's defaults play no part; a checkpoint written
    before sg-train stored one is rebuilt from its hyper-parameters, with a warning that every
    other value takes today's default. Every weight must fit exactly (a checkpoint without the
    expected keys is refused, naming them). Switches only add SuperGlobal components (``scales``
    replaces the default extraction scales); with ``gemp`` a trained GeM p is left unused. They
    change the backbone and the pooling head only, so they apply to either neck (SuperGlobal's
    "l2_fc" and CFCD's "fc_bn").
    Raises FileNotFoundError, :class:`~sg_train.weights_io.WeightsFileError` for a file that
    cannot be read or lacks the sg-train hyper-parameters,
    :class:`~sg_train.model.ModelConfigError` for a stored configuration this version cannot
    read (e.g. a newer one) and :class:`~sg_train.weights_io.WeightsMismatchError` for weights
    that do not fit.
    """
    checkpoint = read_lightning_checkpoint(path)
    stored = stored_model_config(checkpoint)
    if stored is not None:
        arguments = model_config_arguments(stored, what=f"checkpoint {path}")
    else:
        arguments = _arguments_from_hyperparameters(checkpoint, path)
    arguments["head"] = superglobal_head(arguments["head"], rgem=rgem, gemp=gemp, sgem=sgem)
    arguments["relu_plus"] = relu_plus or arguments["relu_plus"]
    if scales is not None:
        arguments["scales"] = tuple(scales)
    model = EmbeddingModel(**arguments)
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
