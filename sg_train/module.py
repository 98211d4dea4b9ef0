"""The LightningModule: an :class:`EmbeddingModel` trained with a margin loss over class weights."""
from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy

from sg_train.errors import OptionError
from sg_train.finetune import CLASS_TRANSFERS, check_configured_as_stored, load_finetune_weights
from sg_train.hard_negatives import scoring_fingerprint
from sg_train.losses import build_loss
from sg_train.losses.local_triplet import check_local_triplet_options, local_triplet_loss_batch
from sg_train.metrics import HeldOutClassification
from sg_train.model import EmbeddingModel
from sg_train.optim import (
    apply_lr_multipliers,
    parameter_groups,
    resolve_warmup_steps,
    warmup_cosine_factor,
    warmup_cosine_schedule,
)
from sg_train.weights_io import write_checkpoint_record


#: Checkpoint key of the learning-rate schedule's length, to tell a resume that changes it.
SCHEDULE_KEY = "sg_train_schedule"


class LandmarkRetrievalModule(pl.LightningModule):
    """Backbone → pooling head → embedding, trained with a margin-based classification loss.

    Args:
        num_classes: training classes (linked from the datamodule by ``train.py``).
        backbone, head, embedding_dim, pretrained_weights, relu_plus: see :class:`EmbeddingModel`.
        model_options: further :class:`EmbeddingModel` keyword arguments (GeM p, R-GeM kernel,
            extraction scales, input format, ...).
        loss: margin-loss name (``arcface``, ``cosface``, ``curricularface``, ``subcenter_arcface``,
            ``dynamic_arcface``, ``madacos``); ``loss_options`` its keyword arguments.
        class_counts: training images per class (linked from the datamodule; used by per-class
            dynamic margins, not stored in the hyper-parameters).
        landmark_ids: the original landmark id of each class, in class order (the GLDv2 label map;
            linked from the datamodule, not a hyper-parameter): stored in every checkpoint, and used
            by ``init_from`` with ``class_transfer="landmark_id"``.
        class_names: the name of each class, in class order (your own photos' classes; linked from
            the datamodule, not a hyper-parameter): stored in every checkpoint, and used by
            ``init_from`` to carry class weights over by name.
        optimizer: optimizer factory, called with the parameter groups.
        backbone_lr_mult: the backbone's learning rate relative to the head's and the loss's.
        warmup: linear warm-up length, in optimizer steps (>= 1) or as a fraction of the run (< 1).
        min_lr_ratio: the cosine schedule's final learning rate relative to the peak.
        init_from: an sg-train or CVNet checkpoint to start from (fine-tuning): the configured
            embedding model must be the file's (its stored configuration) and its weights must fit
            (see :func:`sg_train.finetune.load_finetune_weights`). Not together with
            ``pretrained_weights`` (OptionError): its backbone would replace the file's.
        class_transfer: how ``init_from``'s class weights reach this run's classes: "name" (classes
            of the same name), "landmark_id" (GLDv2 landmark ids) or "none" (all fresh). The log
            lists the classes copied and the new ones.
        channels_last: keep weights and images in NHWC memory layout (faster convolutions on
            recent GPUs with AMP, and on CPU with oneDNN).
        local_triplet_weight: λ of CFCD's second stage (0: off). With λ > 0 the training batches
            are whole tuples (anchor, positive, hard negatives: ``data.hard_negatives``) and the
            loss is ``margin loss + λ · mean over the global batch's tuples of each tuple's local
            triplet sum`` (:mod:`sg_train.losses.local_triplet`, docs/design.md §3).
        local_triplet_options: ``margin`` (0.1), ``ratio`` (0.9), ``top_fraction`` (0.5) of the
            local triplet loss.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        head: str = "gem",
        embedding_dim: int = 2048,
        pretrained_weights: str | None = None,
        relu_plus: bool = False,
        model_options: dict[str, Any] | None = None,
        loss: str = "arcface",
        loss_options: dict[str, Any] | None = None,
        class_counts: list[int] | None = None,
        landmark_ids: list[int] | None = None,
        class_names: list[str] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        backbone_lr_mult: float = 1.0,
        warmup: float = 0.0,
        min_lr_ratio: float = 0.0,
        init_from: str | None = None,
        class_transfer: Literal["name", "landmark_id", "none"] = "name",
        channels_last: bool = False,
        local_triplet_weight: float = 0.0,
        local_triplet_options: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["class_counts", "landmark_ids", "class_names", "optimizer"])
        self.landmark_ids = None if landmark_ids is None else [int(i) for i in landmark_ids]
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        for what, labels in (("landmark_ids", self.landmark_ids), ("class_names", self.class_names)):
            if labels is not None and len(labels) != num_classes:
                raise OptionError(f"{len(labels)} {what} for num_classes={num_classes}; they describe the classes in order")
        if init_from and pretrained_weights:
            raise OptionError(f"give model.init_from ({init_from}) or model.pretrained_weights ({pretrained_weights}), "
                              "not both: init_from's backbone would replace the weights file's")
        if class_transfer not in CLASS_TRANSFERS:
            raise OptionError(f"class_transfer must be one of {CLASS_TRANSFERS}, got {class_transfer!r}")
        if not (math.isfinite(local_triplet_weight) and local_triplet_weight >= 0):
            raise OptionError(f"local_triplet_weight must be a finite number >= 0, got {local_triplet_weight!r}")
        self.local_triplet = check_local_triplet_options(local_triplet_options) if local_triplet_weight > 0 else None
        #: fingerprint of the weights stage 2 starts from (the stage-1 model the hard negatives were
        #: mined with): taken at setup, after init_from, before any step
        self.starting_fingerprint: str | None = None
        self._schedule_total_steps: int | None = None  # optimizer steps of the schedule built for this run
        self._resumed_schedule: tuple[int | None, int] = (None, 0)  # (the checkpoint's schedule length, its step)
        self.model = EmbeddingModel(
            backbone=backbone,
            head=head,
            embedding_dim=embedding_dim,
            pretrained_weights=pretrained_weights,
            relu_plus=relu_plus,
            **(model_options or {}),
        )
        counts = torch.as_tensor(class_counts) if class_counts is not None else None
        self.loss_fn = build_loss(
            loss, embedding_dim=embedding_dim, num_classes=num_classes, class_counts=counts, **(loss_options or {})
        )
        self.optimizer_factory = optimizer
        self.train_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.held_out = HeldOutClassification()
        self.finetune_report: dict[str, list[str]] | None = None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised descriptors, shape (B, embedding_dim)."""
        return self.model(images.contiguous(memory_format=self.memory_format))

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.init_from and self.finetune_report is None:
            self.finetune_report = load_finetune_weights(
                self, self.hparams.init_from, target_landmark_ids=self.landmark_ids,
                target_class_names=self.class_names, class_transfer=self.hparams.class_transfer,
            )
        if stage == "fit" and self.local_triplet is not None:  # before a resume restores the trained weights
            self.starting_fingerprint = scoring_fingerprint(self.model, self.loss_fn)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        write_checkpoint_record(
            checkpoint, model_config=self.model.config, landmark_ids=self.landmark_ids, class_names=self.class_names,
            protocol=self._protocol_name(),
        )
        checkpoint[SCHEDULE_KEY] = {"total_steps": self._schedule_total_steps}

    def _protocol_name(self) -> str | None:
        """The retrieval protocol the run is validated with: the ``protocol`` of the first callback
        that has one (its ``name``, or itself when it is a string); None without a trainer or one."""
        for callback in self.trainer.callbacks if self._trainer is not None else []:
            protocol = getattr(callback, "protocol", None)
            if protocol is not None:
                return protocol if isinstance(protocol, str) else str(getattr(protocol, "name", protocol))
        return None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before the weights are restored: a checkpoint of another model configuration, or trained
        # on another class set (the datamodule's error names the first differing landmark), is refused
        # with the reason instead of a bare tensor size mismatch or, worse, a silent change of model.
        what = f"checkpoint {self.trainer.ckpt_path}" if self._trainer is not None else "the checkpoint"
        check_configured_as_stored(self.model, checkpoint, what)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if hasattr(datamodule, "check_checkpoint"):
            datamodule.check_checkpoint(checkpoint)
        self._resumed_schedule = (checkpoint.get(SCHEDULE_KEY, {}).get("total_steps"), int(checkpoint.get("global_step", 0)))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.local_triplet is not None:
            return self._tuple_training_step(batch)
        images, labels = batch["image"], batch["label"]
        if images.shape[0] == 0:
            # Every image of this batch was unreadable (they are reported by SkippedImagesReport).
            # A zero loss that touches every parameter keeps DDP's gradient all-reduce in step.
            loss = sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
            self._log_global_batch_loss(loss, batch_size=0)
            return loss
        output = self.loss_fn(self(images), labels)
        self.train_accuracy(output.cosine.argmax(dim=1), labels)
        batch_size = labels.shape[0]
        self._log_global_batch_loss(output.loss, batch_size)
        self.log("train/acc", self.train_accuracy, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        for name, value in self.loss_fn.live_stats().items():
            self.log(f"train/loss_{name}", value, batch_size=batch_size)
        return output.loss

    def _tuple_training_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """CFCD stage 2: the margin loss on every image of the batch's tuples plus λ times the mean
        local triplet loss over the global batch's tuples. Each rank's triplet sum is scaled by
        ``world_size / global tuple count`` so that DDP's gradient average is exactly the global
        mean (ranks may hold one tuple more than others). Logs ``train/local_triplet`` (global mean
        per tuple), ``train/local_triplet_weight`` (λ), ``train/matches_per_tuple`` and
        ``train/active_triplets`` (the fraction of triplets with a positive hinge)."""
        images, labels = batch["image"], batch["label"]
        if "tuple_size" not in batch:
            raise OptionError("model.local_triplet_weight > 0 trains on tuples, but the batches are plain images: "
                              "set data.hard_negatives (the mined folder) so the datamodule samples tuples")
        size = int(batch["tuple_size"])
        tuples = images.shape[0] // size
        if tuples:
            descriptors, feature_map = self.model.forward_with_feature_map(
                images.contiguous(memory_format=self.memory_format))
            output = self.loss_fn(descriptors, labels)
            maps = feature_map.reshape(tuples, size, *feature_map.shape[1:])
            losses, stats = local_triplet_loss_batch(maps[:, 0], maps[:, 1], maps[:, 2:], **self.local_triplet)
            self.train_accuracy(output.cosine.argmax(dim=1), labels)
            self.log("train/acc", self.train_accuracy, prog_bar=True, on_step=True, on_epoch=True,
                     batch_size=labels.shape[0])
            classification = output.loss
        else:  # every tuple had an unreadable image: a zero loss that keeps DDP's all-reduce in step
            classification = sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
            losses = classification.new_zeros(0)
            stats = None
        local = torch.stack([losses.detach().sum(), losses.new_tensor(float(tuples)),
                             losses.new_tensor(float(stats.matches.sum()) if stats else 0.0),
                             losses.new_tensor(float(stats.triplets.sum()) if stats else 0.0),
                             losses.new_tensor(float(stats.active.sum()) if stats else 0.0)])
        local_sum, count, matches, triplets, active = self.trainer.strategy.reduce(local, reduce_op="sum")
        weight = float(self.hparams.local_triplet_weight)
        triplet = losses.sum() * (self.trainer.world_size / count) if count > 0 else losses.sum()
        loss = classification + weight * triplet
        self._log_global_batch_loss(loss, labels.shape[0])
        if count > 0:
            self.log_dict({"train/local_triplet": local_sum / count, "train/matches_per_tuple": matches / count,
                           "train/local_triplet_weight": weight})
            if triplets > 0:
                self.log("train/active_triplets", active / triplets)
        return loss

    def _log_global_batch_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        """Log ``train/loss`` as the mean loss over the global batch (every rank's samples).

        Each rank's ``loss`` is the mean over its own ``batch_size`` samples; the ranks' sums and
        counts are all-reduced, so every rank logs ``Σ loss_r·B_r / Σ B_r``. That is the global
        batch's loss even when skipped images leave the ranks with batches of different sizes,
        which Lightning's ``sync_dist`` (an unweighted mean of the rank values) is not. Every rank
        must call this at every step, also with an empty batch (``batch_size = 0``): the all-reduce
        is a collective. A step whose global batch is empty logs nothing.
        """
        totals = torch.stack([loss.detach().float() * batch_size, loss.new_tensor(float(batch_size), dtype=torch.float32)])
        loss_sum, count = self.trainer.strategy.reduce(totals, reduce_op="sum")
        if count > 0:
            self.log("train/loss", loss_sum / count, prog_bar=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images, labels = batch["image"], batch["label"]
        if images.shape[0] > 0:
            confidence, predicted = self.loss_fn.cosine(self(images)).max(dim=1)
        else:  # every image unreadable: an empty update, so a rank with only such batches still gathers typed states
            confidence, predicted = labels.new_empty(0, dtype=torch.float32), labels.new_empty(0)
        self.held_out.update(batch["index"], predicted, confidence, labels)

    def on_validation_epoch_end(self) -> None:
        # compute() gathers every rank's rows and keeps one per dataset index, so the values are the
        # single-process ones and the same on every rank: "max" over the ranks returns them exactly
        # (a mean over three ranks could round), and sync_dist keeps Lightning from warning.
        values = self.held_out.compute()
        self.log_dict({f"val/{name}": value for name, value in values.items()}, prog_bar=True, sync_dist=True, reduce_fx="max")
        self.held_out.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        total_steps = int(self.trainer.estimated_stepping_batches)
        before, step = self._resumed_schedule
        if before is not None and before != total_steps:
            warmup = self.hparams.warmup
            lr_before = warmup_cosine_factor(step, resolve_warmup_steps(warmup, before), before, self.hparams.min_lr_ratio)
            lr_now = warmup_cosine_factor(step, resolve_warmup_steps(warmup, total_steps), total_steps, self.hparams.min_lr_ratio)
            rank_zero_warn(
                f"resuming at step {step} with a learning-rate schedule of {total_steps} optimizer steps; the checkpoint's "
                f"run was scheduled for {before} (trainer.max_epochs/max_steps changed): the warm-up + cosine is redrawn "
                f"for the new length, so the learning rate goes from {lr_before:.3g} to {lr_now:.3g} of its peak"
            )
        return self.build_optimizer(total_steps=total_steps)

    def build_optimizer(self, total_steps: int) -> dict[str, Any]:
        """Optimizer over the parameter groups and its per-step warm-up + cosine schedule."""
        model_groups = self.model.parameter_groups()
        groups = parameter_groups(
            {
                "backbone": (model_groups["backbone"], self.hparams.backbone_lr_mult),
                "head": (model_groups["head"], 1.0),
                "class_weights": (self.loss_fn.named_parameters(), 1.0),
            }
        )
        optimizer = self.optimizer_factory(groups)
        apply_lr_multipliers(optimizer)
        self._schedule_total_steps = total_steps
        warmup_steps = resolve_warmup_steps(self.hparams.warmup, total_steps)
        scheduler = warmup_cosine_schedule(optimizer, warmup_steps, total_steps, self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
