"""What every training datamodule shares: image pipelines that follow the model, seeded
resumable loaders, and the pre-flight checks that stop a useless run before its first step.

A subclass builds ``self.train_dataset`` / ``self.val_dataset`` (:class:`ImageDataset`) in
``setup`` and says who its classes are (``num_classes``, ``class_counts``, ``landmark_ids``,
``class_names``, linked into the model by ``train.py``). Batches are dicts (see
:mod:`datamodules.collate`)::

    {"image": float (B, 3, H, W), "label": long (B,), "index": long (B,), "failed": ["<path>\t<reason>", ...]}

Samples whose file is missing/unreadable/corrupt/truncated are dropped from the batch and
listed in ``"failed"`` (``B`` may be 0: a fully failed batch is returned, not raised).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from sg_train.errors import OptionError, UserInputError
from sg_train.hard_negatives import load_hard_negatives, training_data_fingerprint
from sg_train.weights_io import WeightsMismatchError

from .collate import SkipFailedCollate, TupleCollate
from .image_dataset import ImageDataset, worker_init_fn
from .sampler import SeededSampler
from .tuple_sampler import TupleBatchSampler
from .transforms import build_eval_transform, build_train_transform, resolve_normalization

__all__ = ["ClassMappingError", "ImageClassificationDataModule"]

PREFLIGHT_SAMPLE = 256  # training files checked for existence before the first step
PREFLIGHT_MAX_MISSING = 0.5  # more missing than this fraction of the sample stops the run


class ClassMappingError(WeightsMismatchError):
    """A checkpoint whose class mapping does not match the current data."""


class ImageClassificationDataModule(LightningDataModule):
    """Base of the training datamodules (GLDv2, your own labelled photos).

    Args:
        image_size: training crop size.
        eval_image_size: validation images are resized to this longest side and padded to a
            square (default ``image_size``).
        batch_size / eval_batch_size: per-process batch sizes (eval default: ``batch_size``).
        num_workers, pin_memory, persistent_workers, prefetch_factor: DataLoader settings
            (pinning only where CUDA is present, persistence only with workers).
        mean, std, input_format: leave at ``None``: the pixels are prepared the way the model
            being trained says (``EmbeddingModel.preprocessing``: channel order, mean, std, taken
            at setup from the trainer's LightningModule), the same as retrieval evaluation and
            ``evaluate.py`` prepare them. A value given here must agree with the model's, or
            setup stops naming both. Without a trainer (the datamodule used on its own):
            ImageNet's statistics in RGB, or the values given.
        scale, ratio: RandomResizedCrop area fraction and aspect range.
        hflip_p: horizontal flip probability.
        color_jitter, color_jitter_hue, color_jitter_p: brightness/contrast/saturation strength,
            hue range and probability of the colour jitter.
        jpeg_quality, jpeg_p: JPEG re-compression quality range and probability.
        hard_negatives: CFCD stage 2: the folder ``python -m sg_train.mine_hard_negatives`` wrote
            for this training set and the stage-1 model the run starts from (checked by their
            fingerprints before the first step). Training batches then are whole tuples
            (:class:`~datamodules.tuple_sampler.TupleBatchSampler`): an anchor, a positive of its
            class and ``negatives_per_tuple`` images of the classes the stage-1 model confused it
            with, ``tuples_per_batch`` tuples per device (``batch_size`` is then unused for training).

    Raises :class:`~sg_train.errors.OptionError` for out-of-range values.
    """

    def __init__(
        self,
        image_size: int = 512,
        eval_image_size: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        input_format: Literal["rgb", "bgr"] | None = None,
        scale: tuple[float, float] = (0.25, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_p: float = 0.5,
        color_jitter: float = 0.3,
        color_jitter_hue: float = 0.0,
        color_jitter_p: float = 0.5,
        jpeg_quality: tuple[int, int] = (50, 100),
        jpeg_p: float = 0.25,
        hard_negatives: str | None = None,
        tuples_per_batch: int = 2,
        negatives_per_tuple: int = 6,
    ) -> None:
        super().__init__()
        for name, v in (("image_size", image_size), ("batch_size", batch_size)):
            if int(v) < 1:
                raise OptionError(f"{name} must be >= 1, got {v}")
        if num_workers < 0:
            raise OptionError(f"num_workers must be >= 0, got {num_workers}")
        for name, v in (("tuples_per_batch", tuples_per_batch), ("negatives_per_tuple", negatives_per_tuple)):
            if int(v) < 1:
                raise OptionError(f"{name} must be >= 1, got {v}")
        self.hard_negatives = hard_negatives
        self.tuples_per_batch, self.negatives_per_tuple = int(tuples_per_batch), int(negatives_per_tuple)
        self.requested_preprocessing = {"input_format": input_format, "mean": mean, "std": std}
        self.mean, self.std = resolve_normalization(mean, std, input_format or "rgb")  # validates early
        self.input_format = input_format or "rgb"
        self.image_size = int(image_size)
        self.eval_image_size = int(eval_image_size) if eval_image_size is not None else self.image_size
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.prefetch_factor = prefetch_factor
        self.aug = {
            "scale": tuple(scale),
            "ratio": tuple(ratio),
            "hflip_p": hflip_p,
            "color_jitter": color_jitter,
            "color_jitter_hue": color_jitter_hue,
            "color_jitter_p": color_jitter_p,
            "jpeg_quality": tuple(jpeg_quality),
            "jpeg_p": jpeg_p,
        }
        self.build_train_transform()  # validate augmentation arguments now, not in a worker
        self._data_seed: int | None = None
        self.train_dataset: ImageDataset | None = None
        self.val_dataset: ImageDataset | None = None

    # ------------------------------------------------------------------ classes (subclasses)
    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def class_counts(self) -> torch.Tensor:
        """Training images per class index, ``long`` ``(num_classes,)``."""
        raise NotImplementedError

    @property
    def landmark_ids(self) -> list[int] | None:
        """The original landmark id of each class (GLDv2), or None."""
        return None

    @property
    def class_names(self) -> list[str] | None:
        """The name of each class (your own labelled photos), or None."""
        return None

    # ------------------------------------------------------------------ checkpoints

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Raise :class:`ClassMappingError` if a Lightning checkpoint's class mapping does not fit the data.

        Lightning restores the model *before* the datamodule, so a checkpoint with another class
        count fails first in the model's ``load_state_dict`` with a bare size mismatch. Call this
        from ``LightningModule.on_load_checkpoint`` (it runs before the weights are loaded) to get
        the data-level error instead::

            dm = self.trainer.datamodule if self._trainer is not None else None
            if hasattr(dm, "check_checkpoint"):
                dm.check_checkpoint(checkpoint)

        Checkpoints without this datamodule's state are accepted (nothing to compare).
        """
        state = checkpoint.get(type(self).__qualname__)
        if state is not None:
            self.check_class_mapping(state)

    def check_class_mapping(self, state_dict: dict[str, Any]) -> None:
        """Raise :class:`ClassMappingError` when this datamodule's saved state (``state_dict``)
        describes other classes than the data has (subclasses)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ transforms

    def build_train_transform(self):
        return build_train_transform(
            self.image_size, mean=self.mean, std=self.std, input_format=self.input_format, **self.aug
        )

    def build_eval_transform(self):
        return build_eval_transform(
            self.eval_image_size, pad_to_square=True, mean=self.mean, std=self.std, input_format=self.input_format
        )

    def adopt_model_preprocessing(self, preprocessing: dict[str, Any]) -> None:
        """Prepare pixels as ``preprocessing`` (``EmbeddingModel.preprocessing``) says.

        Raises ValueError when a ``mean``/``std``/``input_format`` given to this datamodule
        contradicts the model's, naming both (one of them would be wrong for training or for
        evaluation).
        """
        model = {"input_format": str(preprocessing["input_format"]).lower(),
                 "mean": tuple(float(v) for v in preprocessing["mean"]),
                 "std": tuple(float(v) for v in preprocessing["std"])}
        for key, wanted in self.requested_preprocessing.items():
            if wanted is None:
                continue
            given = str(wanted).lower() if key == "input_format" else tuple(float(v) for v in wanted)
            if given != model[key]:
                raise UserInputError(
                    f"data.{key}={wanted} contradicts the model's {key} {model[key]} (model.model_options.{key}, or "
                    f"the backbone's pretrained statistics): training and evaluation must prepare pixels the same "
                    f"way; remove data.{key} (the data follows the model), or set model.model_options.{key}"
                )
        self.input_format, self.mean, self.std = model["input_format"], model["mean"], model["std"]

    def adopt_trainer_model(self) -> None:
        """Adopt the preprocessing of the trainer's model, when there is one (call first in ``setup``)."""
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        preprocessing = getattr(getattr(module, "model", None), "preprocessing", None)
        if preprocessing is not None:
            self.adopt_model_preprocessing(preprocessing)

    # ------------------------------------------------------------------ pre-flight

    def check_training_set(self, dataset: ImageDataset, *, source: str, layout_hint: str) -> None:
        """Pre-flight: enough images for one batch, and most of a sample of the files present.

        Every path wrong (another image folder, a wrong layout) would otherwise train on empty
        batches; a few missing files are skipped during training (see ``SkippedImagesReport``).
        ``source`` names the data in messages, ``layout_hint`` says where images must be.
        """
        world = self._world_size()
        if len(dataset) < self.batch_size * world:
            raise UserInputError(
                f"{source}: {len(dataset)} training images are fewer than one batch of data.batch_size="
                f"{self.batch_size}" + (f" on each of {world} processes" if world > 1 else "")
                + f"; set data.batch_size to at most {max(1, len(dataset) // world)} or add images"
            )
        rng = np.random.default_rng(0)
        sample = rng.choice(len(dataset), size=min(len(dataset), PREFLIGHT_SAMPLE), replace=False)
        missing = [dataset.path(int(i)) for i in sample if not os.path.isfile(dataset.path(int(i)))]
        if len(missing) > PREFLIGHT_MAX_MISSING * len(sample):
            raise FileNotFoundError(
                f"{len(missing)} of {len(sample)} sampled training images do not exist, e.g. {missing[:3]}; "
                + layout_hint
            )
        if missing:
            rank_zero_warn(
                f"{len(missing)} of {len(sample)} sampled training images do not exist (e.g. {missing[0]!r}); "
                "missing images are skipped and listed in skipped_images.tsv"
            )

    # ------------------------------------------------------------------ loaders

    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_rank) if trainer is not None else 0

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    @property
    def data_seed(self) -> int:
        """Seed of the training order and augmentations (``torch.initial_seed()`` at first use, i.e.
        ``seed_everything``'s; restored from the checkpoint on resume)."""
        if self._data_seed is None:
            self._data_seed = int(torch.initial_seed() % 2**63)
        return self._data_seed

    def restore_data_seed(self, state_dict: dict[str, Any]) -> None:
        """Take the checkpoint's data seed: the same order and augmentations as before the interruption."""
        if "data_seed" in state_dict:
            self._data_seed = int(state_dict["data_seed"])

    def _worker_options(self) -> dict[str, Any]:
        """The DataLoader's worker settings (persistence and prefetch only with workers)."""
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = int(self.prefetch_factor)
        return kwargs

    def _loader(self, dataset: ImageDataset, batch_size: int, train: bool, size: int) -> DataLoader:
        kwargs = self._worker_options()
        if train:  # order and augmentations from (data_seed, epoch, index) alone: resumable exactly
            kwargs["sampler"] = SeededSampler(
                dataset, num_replicas=self._world_size(), rank=self._rank(), shuffle=True, seed=self.data_seed
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            collate_fn=SkipFailedCollate((3, size, size)),
            worker_init_fn=functools.partial(worker_init_fn, rank=self._rank()),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        module = self.trainer.lightning_module if getattr(self, "trainer", None) is not None else None
        stage_two = getattr(module, "local_triplet", None) is not None
        if stage_two != (self.hard_negatives is not None):
            raise OptionError(
                "CFCD stage 2 needs both model.local_triplet_weight > 0 and data.hard_negatives (the folder "
                "python -m sg_train.mine_hard_negatives wrote): set both, or neither for plain training"
                + (" (tuples need a LightningModule with the local triplet loss)" if module is None else ""))
        if stage_two:
            return self._tuple_loader(self.train_dataset, module)
        return self._loader(self.train_dataset, self.batch_size, True, self.image_size)

    def _tuple_loader(self, dataset: ImageDataset, module: Any) -> DataLoader:
        """Whole tuples of the mined hard negatives, checked against this data and the starting model."""
        trainer = self.trainer
        if trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise OptionError("CFCD stage 2 shards whole tuples itself: set trainer.use_distributed_sampler=false "
                              "(Lightning would otherwise replace the tuple sampler)")
        mined = load_hard_negatives(self.hard_negatives, model_fingerprint=module.starting_fingerprint,
                                    data_fingerprint=training_data_fingerprint(self))
        sampler = TupleBatchSampler(dataset.labels, mined.wrong_classes, tuples_per_batch=self.tuples_per_batch,
                                    negatives_per_tuple=self.negatives_per_tuple, seed=self.data_seed,
                                    num_replicas=self._world_size(), rank=self._rank())
        if trainer.is_global_zero:
            rank_zero_info(f"CFCD stage 2: {sampler.num_tuples} tuples per epoch of 1 anchor, 1 positive and "
                  f"{self.negatives_per_tuple} negatives ({100 * sampler.hard_negative_fraction:.1f} % from the mined "
                  f"classes); {sampler.single_image_classes} single-image classes give no anchor")
        kwargs = self._worker_options()
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            collate_fn=TupleCollate(sampler.tuple_size, (3, self.image_size, self.image_size)),
            worker_init_fn=functools.partial(worker_init_fn, rank=self._rank()),
            **kwargs,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            self.setup("validate")
        if self.val_dataset is None:  # nothing held out
            return []
        return self._loader(self.val_dataset, self.eval_batch_size, False, self.eval_image_size)
