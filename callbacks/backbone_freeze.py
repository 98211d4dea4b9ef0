"""Freeze the backbone for the first epochs of a fine-tuning run, then train it.

While the backbone is frozen only the pooling head, the embedding layer and the loss's class
weights learn, so a new head (or a new class set) settles before its gradients reach pretrained
features. From the unfreeze epoch on the backbone trains with the learning rate the module
already gives it (``model.backbone_lr_mult`` times the head's, under the same warm-up + cosine).
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from sg_train.errors import OptionError

__all__ = ["BackboneFreeze", "FROZEN_METRIC"]

#: Logged once per training epoch: 1.0 while the backbone is frozen, 0.0 while it trains.
FROZEN_METRIC = "train/backbone_frozen"


class BackboneFreeze(BaseFinetuning):
    """Keep ``pl_module.model.backbone`` fixed during epochs ``< unfreeze_at_epoch``, then train it.

    A frozen epoch: every backbone parameter has ``requires_grad=False``, so autograd records
    nothing through the backbone (no backward pass, no gradient), and AdamW/SGD skip parameters
    whose ``.grad`` is None: neither the update nor weight decay touch them (bit-identical). Every
    batch-norm layer of the backbone (``torch.nn.modules.batchnorm._BatchNorm``: BatchNorm1d/2d/3d,
    SyncBatchNorm, timm's BatchNormAct2d) is in eval mode: it normalises with its running statistics
    and leaves ``running_mean``, ``running_var`` and ``num_batches_tracked`` as they are. Eval mode
    is set again before every training batch, so a hook that puts the module back into train mode
    mid-epoch (an overridden ``on_validation_model_train`` calling ``self.train()``) cannot let the
    statistics move. From epoch ``unfreeze_at_epoch`` on, the parameters frozen here train again
    and the batch-norm layers follow the backbone's mode (train). Parameters that were already
    frozen before the run (``requires_grad=False``; the module's optimizer leaves them out) stay so.

    The optimizer is not touched: ``LandmarkRetrievalModule.build_optimizer`` already puts the
    backbone in its ``backbone``/``backbone_no_decay`` groups at ``backbone_lr_mult`` times the
    head's learning rate, and its warm-up + cosine schedule runs over every group from step 0, so the
    backbone starts at the schedule's value of its unfreeze step (the warm-up is spent while frozen
    when it is shorter than the frozen epochs).

    Departures from the recipe of Lightning's ``BaseFinetuning``, and why:

    - The freeze happens at the start of each frozen epoch (:meth:`finetune_function`), not in
      :meth:`freeze_before_training`, which Lightning calls in ``setup``, before the optimizer and
      the DDP wrapper exist: the module's ``parameter_groups`` leaves frozen parameters out (the
      backbone would have no optimizer group), and ``DistributedDataParallel`` registers only the
      parameters that require grad when it is built: parameters unfrozen later get no gradient
      all-reduce and the ranks drift apart without any error (measured with Lightning 2.6.6 on
      2 CPU processes, with and without ``find_unused_parameters``).
    - Under DDP the frozen backbone parameters get no gradient, which torch DDP accepts only when
      built with ``find_unused_parameters=True`` (it then leaves the ``.grad`` of parameters unused
      on every rank as None) and without ``static_graph`` (the graph changes at the unfreeze
      epoch). The strategy is checked at fit start, before the first step: use
      ``trainer.strategy: ddp_find_unused_parameters_true``.
    - No callback state in checkpoints: whether an epoch is frozen follows from
      ``trainer.current_epoch``, which Lightning restores, so a run resumed from a checkpoint
      written before epoch ``unfreeze_at_epoch`` stays frozen until then and one resumed later
      trains the backbone from its first batch. The base class's state (a copy of the optimizer's
      parameter groups, which it reinstates on resume) serves ``unfreeze_and_add_param_group``,
      which this callback does not use.

    Logs :data:`FROZEN_METRIC` (``train/backbone_frozen``: 1.0 frozen, 0.0 trained) once per
    training epoch. When fitting ends (or fails) the parameters frozen here require grad again
    and the batch-norm layers follow the backbone's mode: the module is left as it was found.

    Attributes:
        frozen: whether the backbone is frozen now (by this callback).

    Args:
        unfreeze_at_epoch: the first epoch (0-based) whose batches train the backbone; epochs
            ``0 .. unfreeze_at_epoch - 1`` are frozen. 0 never freezes; a value
            ``>= trainer.max_epochs`` never trains the backbone (warned at fit start).

    Raises:
        OptionError: ``unfreeze_at_epoch`` is not a whole number >= 0 (at construction); the
            module has no ``model.backbone`` module, or has frozen epochs and starts from random
            weights (at setup); the run has frozen epochs and is
            distributed other than by torch DDP with ``find_unused_parameters=True`` and no
            ``static_graph`` (at fit start).
    """

    def __init__(self, unfreeze_at_epoch: int = 1) -> None:
        super().__init__()
        if isinstance(unfreeze_at_epoch, bool) or not isinstance(unfreeze_at_epoch, int) or unfreeze_at_epoch < 0:
            raise OptionError(
                f"BackboneFreeze unfreeze_at_epoch must be a whole number of epochs >= 0 (the first 0-based epoch that "
                f"trains the backbone), got {unfreeze_at_epoch!r}; e.g. init_args: {{unfreeze_at_epoch: 1}} freezes "
                "epoch 0 only, 0 never freezes"
            )
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.frozen = False  # whether the backbone is frozen now
        self._frozen_params: list[nn.Parameter] = []  # the parameters this callback set requires_grad=False on

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        """Check that the module has a backbone to freeze, and (for a module configured with
        ``init_from``/``pretrained_weights``, as :class:`~sg_train.module.LandmarkRetrievalModule`
        is) that it starts from weights: freezing a randomly initialised backbone trains the head on
        random features. The freeze itself waits for the first epoch (see the class notes: the
        optimizer and the DDP wrapper must see it trainable)."""
        _backbone(pl_module)
        hparams = getattr(pl_module, "hparams", {})
        if (self.unfreeze_at_epoch > 0 and "init_from" in hparams and not hparams.get("init_from")
                and not hparams.get("pretrained_weights")):
            raise OptionError(
                f"BackboneFreeze(unfreeze_at_epoch={self.unfreeze_at_epoch}) keeps the backbone as it starts, but this "
                "run starts it from random weights (model.init_from and model.pretrained_weights are both unset): "
                "give --model.init_from <checkpoint> (or model.pretrained_weights <file>), or drop BackboneFreeze"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.unfreeze_at_epoch == 0:
            return
        self._check_distributed(trainer)
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= self.unfreeze_at_epoch:
            rank_zero_warn(
                f"BackboneFreeze(unfreeze_at_epoch={self.unfreeze_at_epoch}) with trainer.max_epochs="
                f"{trainer.max_epochs}: the backbone is never trained in this run (only the head and the class "
                f"weights are); set unfreeze_at_epoch below {trainer.max_epochs} to train it"
            )

    def _check_distributed(self, trainer: pl.Trainer) -> None:
        """Refuse a distributed run that frozen epochs would break (see the class notes)."""
        ddp = trainer.model if isinstance(trainer.model, DistributedDataParallel) else None
        if ddp is None and trainer.world_size == 1:
            return
        if ddp is not None and ddp.find_unused_parameters and not ddp.static_graph:
            return
        strategy = type(trainer.strategy).__name__
        if ddp is None:
            problem = f"{strategy} over {trainer.world_size} processes is not torch DDP, the only one verified with it"
        elif ddp.static_graph:
            problem = "DDP with static_graph=True fails when the backbone starts training (its graph changes)"
        else:
            problem = ("DDP without find_unused_parameters stops at the second step, as the frozen backbone parameters "
                       "get no gradient")
        raise OptionError(
            f"BackboneFreeze(unfreeze_at_epoch={self.unfreeze_at_epoch}) freezes the backbone for the first epochs, and "
            f"{problem}: set trainer.strategy: ddp_find_unused_parameters_true (or "
            "ddp_spawn_find_unused_parameters_true; in Python DDPStrategy(find_unused_parameters=True)). A run "
            f"resumed at epoch {self.unfreeze_at_epoch} or later freezes nothing and may drop the callback instead"
        )

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """Freeze the backbone when ``epoch < unfreeze_at_epoch``, release it otherwise (called by
        the base class at every training epoch start, once per optimizer)."""
        backbone = _backbone(pl_module)
        if epoch < self.unfreeze_at_epoch:
            if not self.frozen:
                self._frozen_params = [p for p in backbone.parameters() if p.requires_grad]
                for param in self._frozen_params:
                    param.requires_grad_(False)
                self.frozen = True
            _set_norm_mode(backbone, training=False)
        elif self.frozen:
            self._release(backbone)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        # The same value on every rank; sync_dist keeps Lightning from warning about an unsynced epoch metric.
        pl_module.log(FROZEN_METRIC, float(self.frozen), on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.frozen:
            _set_norm_mode(_backbone(pl_module), training=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.frozen:
            self._release(_backbone(pl_module))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.frozen:
            self._release(_backbone(pl_module))

    def _release(self, backbone: nn.Module) -> None:
        for param in self._frozen_params:
            param.requires_grad_(True)
        self._frozen_params = []
        _set_norm_mode(backbone, training=backbone.training)
        self.frozen = False

    def state_dict(self) -> dict[str, Any]:
        """Nothing to save (an empty dict, which Lightning leaves out of the checkpoint): see the class notes."""
        return {}


def _backbone(pl_module: pl.LightningModule) -> nn.Module:
    """``pl_module.model.backbone``; :class:`OptionError` when the module has none."""
    backbone = getattr(getattr(pl_module, "model", None), "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise OptionError(
            f"BackboneFreeze needs a LightningModule whose model.backbone is a torch module (as "
            f"sg_train.module.LandmarkRetrievalModule has); {type(pl_module).__name__} has none: remove the "
            "BackboneFreeze callback from trainer.callbacks"
        )
    return backbone


def _set_norm_mode(backbone: nn.Module, training: bool) -> None:
    """Put every batch-norm layer of ``backbone`` in train (``training=True``) or eval mode."""
    for module in backbone.modules():
        if isinstance(module, _BatchNorm):
            module.train(training)
