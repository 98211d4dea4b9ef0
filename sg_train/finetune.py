"""Start a run from an earlier sg-train checkpoint, possibly on a different set of classes.

The embedding model must fit completely (names and shapes): a checkpoint of another backbone or
head is refused, never half-loaded. The class weights of the margin loss are taken whole when the
class set is the same; when it differs, rows of landmarks present in both runs are copied (matched
by their original landmark ids) and the rest keep their fresh initialisation. Strict
``load_state_dict(strict=False)`` cannot do this: it still fails on a shape mismatch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from sg_train.backbone import WeightsFileError, load_torch_file, state_dict_mismatches

MODEL_PREFIX = "model."
LOSS_PREFIX = "loss_fn."
CHECKPOINT_CONTENT = "a Lightning checkpoint (.ckpt) written by train.py"


def read_lightning_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint onto the CPU and check that it holds a ``state_dict``.

    Lightning checkpoints pickle their hyper-parameters, so ``weights_only=False`` is needed: load
    only checkpoints you trust. Raises FileNotFoundError for a missing file and
    :class:`~sg_train.backbone.WeightsFileError` (a ValueError) naming the path for a file that is
    empty, truncated or not a Lightning checkpoint (its size, or the keys it holds).
    """
    path = Path(path)
    checkpoint = load_torch_file(path, what="checkpoint", expected=CHECKPOINT_CONTENT, weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = sorted(map(str, checkpoint))[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise WeightsFileError(
            f"{path} is not a Lightning checkpoint: no 'state_dict' key (found: {keys}); it should be "
            f"{CHECKPOINT_CONTENT} (a plain weights file goes to pretrained_weights instead)"
        )
    return checkpoint


def split_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def check_exact_fit(target: nn.Module, source: dict[str, torch.Tensor], what: str) -> None:
    """Raise naming every missing, unexpected or wrongly shaped key of ``source`` for ``target``."""
    problems = state_dict_mismatches(target.state_dict(), source)
    if problems:
        raise ValueError(f"{what} does not fit the configured model (nothing was loaded); " + "; ".join(problems))


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


def landmark_ids_in(checkpoint: dict[str, Any]) -> list[int] | None:
    """The original landmark id of each class, as the datamodule stored it in the checkpoint."""
    for value in checkpoint.values():
        if isinstance(value, dict) and "landmark_ids" in value:
            return list(value["landmark_ids"])
    return None


def load_finetune_weights(
    module: nn.Module, path: str | Path, target_landmark_ids: list[int] | None = None
) -> dict[str, Any]:
    """Initialise ``module.model`` and ``module.loss_fn`` from the sg-train checkpoint at ``path``."""
    checkpoint = read_lightning_checkpoint(path)
    state = checkpoint["state_dict"]
    model_state = split_state_dict(state, MODEL_PREFIX)
    check_exact_fit(module.model, model_state, f"checkpoint {path}")
    module.model.load_state_dict(model_state)
    account = transfer_class_weights(
        module.loss_fn, split_state_dict(state, LOSS_PREFIX), landmark_ids_in(checkpoint), target_landmark_ids
    )
    rank_zero_info(f"init_from {path}: embedding model loaded ({len(model_state)} tensors); {account}")
    return {"path": str(path), "model_tensors": len(model_state), "class_weights": account}
