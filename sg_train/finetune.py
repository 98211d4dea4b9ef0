"""Start a run from trained weights (``model.init_from``), possibly on a different set of classes.

Sources: an sg-train checkpoint, or a CVNet/pycls checkpoint (the weights SuperGlobal
evaluates); a timm backbone weights file goes to ``model.pretrained_weights`` instead. The
embedding model must be the one the file holds: its stored configuration
(:attr:`EmbeddingModel.config <sg_train.model.EmbeddingModel.config>`) must agree with the
configured model on every value that changes what the loaded weights compute, and the weights
must fit completely (names and shapes). A file of another backbone, head or preprocessing is
refused, never half-loaded. The class weights of the margin loss are taken whole when the class
set is the same; when it differs, rows of classes present in both runs are copied, matched by
class name (``class_transfer="name"``, the default) or, when asked, by GLDv2 landmark id
(``"landmark_id"``), never by position; the rest keep their fresh initialisation, and the log
names both groups. ``load_state_dict(strict=False)`` cannot do this: it still fails on a shape
mismatch.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from sg_train.cvnet import CVNET_MEAN_BGR, CVNET_STD_BGR, cvnet_state_dict_to_embedding_model
from sg_train.errors import OptionError
from sg_train.model import EmbeddingModel, config_differences, model_config_arguments
from sg_train.weights_io import (
    CHECKPOINT_CONTENT,
    LOSS_PREFIX,
    MODEL_PREFIX,
    WeightsMismatchError,
    check_exact_fit,
    load_torch_file,
    as_lightning_checkpoint,
    split_state_dict,
    stored_class_names,
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


#: how class weights are carried over to a run on other classes
CLASS_TRANSFERS = ("name", "landmark_id", "none")


def class_name_key(name: str) -> str:
    """What makes two class names one class: Unicode NFC, case-folded ('Hôtel de Ville', decomposed
    or not, is 'hôtel de ville'). The photo data check refuses two classes of one key; fine-tuning
    copies class weights between names of one key."""
    return unicodedata.normalize("NFC", str(name)).casefold()
_SHOWN = 12  # class names listed in the log line


def _listed(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def transfer_class_weights(
    loss_fn: nn.Module,
    source: dict[str, torch.Tensor],
    source_keys: list | None,
    target_keys: list | None,
    by: str = "name",
) -> dict[str, Any]:
    """Carry the margin loss's state over from ``source`` (a checkpoint's ``loss_fn.*`` tensors).

    ``source_keys``/``target_keys`` identify each class in class order under ``by``: class
    names (``"name"``; compared in Unicode NFC and case-folded, as the data check compares them) or
    GLDv2 landmark ids (``"landmark_id"``); ``by="none"`` transfers nothing. The same classes in
    the same order: the whole state is loaded (also learnt margins and statistics). Other classes:
    the rows of ``weight`` of classes present in both runs are copied, the others keep their fresh
    initialisation (sub-centre weights are never copied row-wise). Without names on either side
    nothing is copied (the account says so). Nothing is ever matched by position.

    Returns ``{"account": one line, "copied": [class], "new": [class]}`` (classes as this run
    writes them). Raises :class:`OptionError` for an unknown ``by``, and for ``by="landmark_id"``
    when either side has no landmark ids (it would copy nothing).
    """
    if by not in CLASS_TRANSFERS:
        raise OptionError(f"class_transfer must be one of {CLASS_TRANSFERS}, got {by!r}")
    result: dict[str, Any] = {"copied": [], "new": list(target_keys or [])}
    if by == "none":
        return {**result, "account": "class weights: not transferred (model.class_transfer=none), all initialised fresh"}
    what = "class names" if by == "name" else "landmark ids"
    if source_keys is None or target_keys is None:
        side = "the checkpoint has" if source_keys is None else "this run's data has"
        if by == "landmark_id":  # asked for explicitly: it would copy nothing
            raise OptionError(f"model.class_transfer=landmark_id, but {side} no GLDv2 landmark ids (class folders "
                              "and CSVs have class names): use model.class_transfer=name, or none")
        hint = " (GLDv2 runs have landmark ids: model.class_transfer=landmark_id copies by those)"
        return {**result, "account": f"class weights: initialised fresh; {side} no {what} to match classes by{hint}"}
    match = class_name_key if by == "name" else (lambda key: key)
    own = loss_fn.state_dict()
    same_shapes = set(own) == set(source) and all(own[k].shape == source[k].shape for k in own)
    if same_shapes and [match(k) for k in source_keys] == [match(k) for k in target_keys]:
        loss_fn.load_state_dict(source)
        return {"copied": list(target_keys), "new": [],
                "account": f"class weights: all {len(target_keys)} classes loaded (the same {what})"}
    weight = own.get("weight")
    source_weight = source.get("weight")
    if weight is None or source_weight is None or weight.shape[0] != len(target_keys) \
            or source_weight.shape != (len(source_keys), weight.shape[1]):
        return {**result, "account": "class weights: initialised fresh (sub-centre or differently sized weights "
                                     "cannot be matched row by row)"}
    source_row = {match(key): row for row, key in enumerate(source_keys)}
    pairs = [(row, source_row[match(key)]) for row, key in enumerate(target_keys) if match(key) in source_row]
    if pairs:
        rows, src_rows = (torch.tensor(x) for x in zip(*pairs))
        with torch.no_grad():
            loss_fn.weight[rows] = source_weight[src_rows].to(loss_fn.weight)
    copied = [target_keys[row] for row, _ in pairs]
    new = [key for key in target_keys if match(key) not in source_row]
    account = f"class weights: {len(copied)} of {len(target_keys)} classes copied by {what}"
    if copied:
        account += f" ({_listed([str(k) for k in copied])})"
    if new:
        account += f"; {len(new)} new, initialised fresh ({_listed([str(k) for k in new])})"
    return {"copied": copied, "new": new, "account": account}


def load_finetune_weights(
    module: nn.Module,
    path: str | Path,
    *,
    target_landmark_ids: list[int] | None = None,
    target_class_names: list[str] | None = None,
    class_transfer: str = "name",
) -> dict[str, Any]:
    """Initialise ``module.model`` (and ``module.loss_fn``'s class weights) from the file at ``path``.

    ``path`` is an sg-train checkpoint or a CVNet/pycls checkpoint (``model_state``, the weights
    SuperGlobal evaluates). sg-train: the configured ``module.model`` must be the checkpoint's
    model (:func:`check_configured_as_stored`; a checkpoint without a stored configuration only
    warns that it cannot be checked) and its weights must fit exactly; class weights follow
    :func:`transfer_class_weights` by ``class_transfer`` ("name", "landmark_id" or "none").
    CVNet: the configured model must be what the file holds (``resnet50``/``resnet101``, its FC
    size, BGR input with CVNet's mean/std); class weights start fresh. Raises
    FileNotFoundError, :class:`~sg_train.weights_io.WeightsFileError` for an unreadable file
    and :class:`~sg_train.weights_io.WeightsMismatchError` for one that does not fit, before any
    tensor is copied.

    Returns ``{"path", "source": "sg-train" | "cvnet", "model_tensors", "class_weights": account,
    "copied": [...], "new": [...]}`` and logs the account.
    """
    if class_transfer not in CLASS_TRANSFERS:
        raise OptionError(f"class_transfer must be one of {CLASS_TRANSFERS}, got {class_transfer!r}")
    checkpoint = load_torch_file(path, what="checkpoint", expected=CHECKPOINT_CONTENT, weights_only=False)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model_state"), dict) and "state_dict" not in checkpoint:
        report = _load_cvnet(module, checkpoint["model_state"], path)
    else:
        checkpoint = as_lightning_checkpoint(checkpoint, path)
        what = f"checkpoint {path}"
        check_configured_as_stored(module.model, checkpoint, what)
        state = checkpoint["state_dict"]
        model_state = split_state_dict(state, MODEL_PREFIX)
        check_exact_fit(module.model, model_state, what)
        module.model.load_state_dict(model_state)
        if class_transfer == "landmark_id":
            keys = (stored_landmark_ids(checkpoint), target_landmark_ids)
        else:
            keys = (stored_class_names(checkpoint), target_class_names)
        transfer = transfer_class_weights(module.loss_fn, split_state_dict(state, LOSS_PREFIX), *keys, by=class_transfer)
        report = {"source": "sg-train", "model_tensors": len(model_state), **transfer}
    report = {"path": str(path), **report, "class_weights": report.pop("account")}
    rank_zero_info(f"init_from {path}: embedding model loaded ({report['model_tensors']} tensors); "
                   f"{report['class_weights']}")
    return report


def _load_cvnet(module: nn.Module, model_state: dict[str, torch.Tensor], path: str | Path) -> dict[str, Any]:
    """Load CVNet weights into ``module.model`` configured as the file's model (else refuse, naming values)."""
    configured = module.model.config
    depth = {"resnet50": 50, "resnet101": 101}.get(configured["backbone"])
    if depth is None:
        raise WeightsMismatchError(f"{path} holds CVNet (pycls ResNet-50/101) weights; model.backbone is "
                                   f"{configured['backbone']!r}: set model.backbone to resnet50 or resnet101")
    fixed = {"backbone", "embedding_dim", "input_format", "mean", "std", "format", "version"}
    options = {k: v for k, v in model_config_arguments(configured).items() if k not in fixed}
    try:
        loaded = cvnet_state_dict_to_embedding_model(model_state, depth, **options)
    except WeightsMismatchError as exc:
        raise WeightsMismatchError(f"{path}: {exc}") from exc
    differences = config_differences(model_config_arguments(loaded.config), model_config_arguments(configured),
                                     ignore=FREE_WHEN_LOADING)
    if differences:
        raise WeightsMismatchError(
            f"{path} holds a CVNet model the configured one is not (nothing was loaded): " + "; ".join(differences)
            + ". CVNet takes BGR input: set model.model_options.input_format=bgr, mean="
            f"{list(CVNET_MEAN_BGR)}, std={list(CVNET_STD_BGR)}, and model.embedding_dim to its FC size"
        )
    state = loaded.state_dict()
    check_exact_fit(module.model, state, f"CVNet weights {path}")
    module.model.load_state_dict(state)
    return {"source": "cvnet", "model_tensors": len(state), "copied": [], "new": [],
            "account": "class weights: initialised fresh (CVNet weights have no class weights)"}
