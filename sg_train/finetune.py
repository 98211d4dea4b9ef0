"""Start a run from an earlier sg-train checkpoint, possibly on a different set of classes.

The embedding model must be the one the checkpoint holds: its stored configuration
(:attr:`EmbeddingModel.config <sg_train.model.EmbeddingModel.config>`) must agree with the
configured model on every value that changes what the loaded weights compute, and the weights
must fit completely (names and shapes). A checkpoint of another backbone, head or preprocessing is
refused, never half-loaded. The class weights of the margin loss are taken whole when the class
set is the same; when it differs, rows of landmarks present in both runs are copied (matched by
their original landmark ids) and the rest keep their fresh initialisation. Strict
``load_state_dict(strict=False)`` cannot do this: it still fails on a shape mismatch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from sg_train.model import EmbeddingModel, config_differences, model_config_arguments
from sg_train.weights_io import (
    LOSS_PREFIX,
    MODEL_PREFIX,
    WeightsMismatchError,
    check_exact_fit,
    read_lightning_checkpoint,
    split_state_dict,
    stored_landmark_ids,
    stored_model_config,
)

#: configuration values a model may change when it starts from a checkpoint's weights: GeM's
#: initial p (the loaded p replaces it) and the default extraction scales (evaluation picks its own)
FREE_WHEN_LOADING = frozenset({"gem_p", "scales"})


def check_configured_as_stored(model: EmbeddingModel, checkpoint: dict[str, Any], what: str) -> None:
    """Check that ``model`` is configured as the checkpoint's stored model configuration says.

    Compares every value in effect except :data:`FREE_WHEN_LOADING`. A checkpoint written before
    sg-train stored its configuration cannot be checked: that is said in a warning. Raises
    :class:`~sg_train.weights_io.WeightsMismatchError` listing each differing value (the
    checkpoint's and the configured one) and where to set it; ``what`` names the checkpoint.
    :class:`~sg_train.model.ModelConfigError` for a stored configuration this version cannot read.
    """
    stored = stored_model_config(checkpoint)
    if stored is None:
        rank_zero_warn(
            f"{what} stores no model configuration (written before sg-train stored one), so only its weights "
            "can be checked: the values that are not weights (GeM+ p, R-GeM p and kernel, Scale-GeM mode and p, "
            "ReLU+ alpha, preprocessing) are this run's configured ones"
        )
        return
    differences = config_differences(
        model_config_arguments(stored, what=what), model_config_arguments(model.config), ignore=FREE_WHEN_LOADING
    )
    if differences:
        raise WeightsMismatchError(
            f"{what} holds a model configured differently from this run's (nothing was loaded): "
            + "; ".join(differences)
            + ". Configure the model as the checkpoint has it (model.backbone, model.head, model.embedding_dim, "
            "model.relu_plus, the rest under model.model_options)"
        )


def transfer_class_weights(
    loss_fn: nn.Module,
    source: dict[str, torch.Tensor],
    source_ids: list[int] | None,
    target_ids: list[int] | None,
) -> str:
    """Copy the margin loss's state from ``source``; returns a one-line account of what was kept."""
    own = loss_fn.state_dict()
    same_shapes = set(own) == set(source) and all(own[k].shape == source[k].shape for k in own)
    same_classes = source_ids is None or target_ids is None or list(source_ids) == list(target_ids)
    if same_shapes and same_classes:
        loss_fn.load_state_dict(source)
        return "class weights: all loaded"
    weight = own.get("weight")
    if source_ids is None or target_ids is None or weight is None or weight.shape[0] != len(target_ids):
        return "class weights: re-initialised (class set differs and landmark ids are unknown or sub-centred)"
    source_weight = source["weight"]
    if source_weight.shape[0] != len(source_ids) or source_weight.shape[1] != weight.shape[1]:
        return "class weights: re-initialised (checkpoint weights do not match its landmark ids)"
    source_row = {landmark: row for row, landmark in enumerate(source_ids)}
    pairs = [(row, source_row[landmark]) for row, landmark in enumerate(target_ids) if landmark in source_row]
    if pairs:
        rows, src_rows = (torch.tensor(x) for x in zip(*pairs))
        with torch.no_grad():
            loss_fn.weight[rows] = source_weight[src_rows].to(loss_fn.weight)
    return f"class weights: {len(pairs)} of {len(target_ids)} classes copied by landmark id, others re-initialised"


def load_finetune_weights(
    module: nn.Module, path: str | Path, target_landmark_ids: list[int] | None = None
) -> dict[str, Any]:
    """Initialise ``module.model`` and ``module.loss_fn`` from the sg-train checkpoint at ``path``.

    The configured ``module.model`` must be the checkpoint's model (:func:`check_configured_as_stored`;
    a checkpoint without a stored configuration only warns that it cannot be checked) and its
    weights must fit exactly. Raises FileNotFoundError,
    :class:`~sg_train.weights_io.WeightsFileError` for an unreadable file and
    :class:`~sg_train.weights_io.WeightsMismatchError` for one that does not fit, before any
    tensor is copied.
    """
    checkpoint = read_lightning_checkpoint(path)
    what = f"checkpoint {path}"
    check_configured_as_stored(module.model, checkpoint, what)
    state = checkpoint["state_dict"]
    model_state = split_state_dict(state, MODEL_PREFIX)
    check_exact_fit(module.model, model_state, what)
    module.model.load_state_dict(model_state)
    account = transfer_class_weights(
        module.loss_fn, split_state_dict(state, LOSS_PREFIX), stored_landmark_ids(checkpoint), target_landmark_ids
    )
    rank_zero_info(f"init_from {path}: embedding model loaded ({len(model_state)} tensors); {account}")
    return {"path": str(path), "model_tensors": len(model_state), "class_weights": account}
