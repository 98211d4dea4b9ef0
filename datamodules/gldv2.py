"""Google Landmarks v2 LightningDataModule.

``num_classes``, ``class_counts`` and ``landmark_ids`` are computed from the CSV on first
access (LightningCLI links ``data.num_classes`` to the model at instantiation). The
contiguous relabelling travels in Lightning checkpoints through ``state_dict`` /
``load_state_dict`` and is checked against the data on resume.

Batches, loaders and pre-flight checks: :mod:`datamodules.classification`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from sg_train.errors import OptionError

from .classification import ClassMappingError, ImageClassificationDataModule
from .gldv2_index import GLDv2Split, build_gldv2_split, default_split_path, gldv2_image_path
from .image_dataset import ImageDataset

__all__ = ["ClassMappingError", "GLDv2DataModule"]

STATE_VERSION = 1


class GLDv2DataModule(ImageClassificationDataModule):
    """GLDv2 (``train.csv`` or ``train_clean.csv``) with a held-out stratified validation split.

    Args:
        data_root: dataset folder (holds the CSV, ``train/`` and ``splits/``).
        csv: CSV file name under ``data_root``, or an absolute path.
        image_dir: image folder (default ``<data_root>/train``).
        min_images_per_class: landmarks with fewer images (in the CSV) are dropped.
        val_fraction: stratified validation fraction per class (0 disables validation).
        split_file: JSON split file; default ``<data_root>/splits/<csv>_min<m>_val<f>_seed<s>.json``.
            Written once (atomically), then reused; refused if it does not fit the CSV.
        seed: split seed.
        **kwargs: image sizes, batch sizes, loader settings, preprocessing and augmentations:
            see :class:`~datamodules.classification.ImageClassificationDataModule`.
    """

    def __init__(
        self,
        data_root: str,
        csv: str = "train_clean.csv",
        image_dir: str | None = None,
        min_images_per_class: int = 2,
        val_fraction: float = 0.05,
        split_file: str | None = None,
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if min_images_per_class < 1:
            raise OptionError(f"min_images_per_class must be >= 1, got {min_images_per_class}")
        if not 0 <= val_fraction < 1:
            raise OptionError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        self.data_root = os.fspath(data_root)
        self.csv = csv
        self.csv_path = csv if os.path.isabs(csv) else os.path.join(self.data_root, csv)
        self.image_dir = os.fspath(image_dir) if image_dir is not None else os.path.join(self.data_root, "train")
        self.min_images_per_class = int(min_images_per_class)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        if self.val_fraction == 0:
            self.split_file = None
        elif split_file is not None:
            self.split_file = os.fspath(split_file)
        else:
            self.split_file = default_split_path(
                self.data_root, csv, self.min_images_per_class, self.val_fraction, self.seed
            )
        self._split: GLDv2Split | None = None

    # ------------------------------------------------------------------ index (lazy)

    @property
    def split(self) -> GLDv2Split:
        """The relabelled, split index (read from the CSV on first access)."""
        if self._split is None:
            self._split = build_gldv2_split(
                self.csv_path,
                min_images_per_class=self.min_images_per_class,
                val_fraction=self.val_fraction,
                seed=self.seed,
                split_file=self.split_file,
            )
        return self._split

    @property
    def num_classes(self) -> int:
        return self.split.num_classes

    @property
    def class_counts(self) -> torch.Tensor:
        """Training images per contiguous label, ``long`` ``(num_classes,)``."""
        return torch.from_numpy(self.split.class_counts.copy())

    @property
    def landmark_ids(self) -> list[int]:
        """Original GLDv2 landmark id of each contiguous label."""
        return [int(x) for x in self.split.landmark_ids]

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"GLDv2 image folder not found: {self.image_dir} (set image_dir)")
        self.adopt_trainer_model()
        split = self.split
        if self.train_dataset is None and stage in (None, "fit"):
            self.train_dataset = ImageDataset(
                split.train_ids, split.train_labels, self.image_dir, self.build_train_transform(), gldv2_image_path
            )
            self.check_training_set(
                self.train_dataset,
                source=f"{self.csv_path} (after min_images_per_class={self.min_images_per_class} and the "
                f"val_fraction={self.val_fraction} split)",
                layout_hint=f"images must be at <image_dir>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg under {self.image_dir!r} "
                f"with the ids exactly as in {self.csv_path} (same case); set data.image_dir to the folder holding "
                "those sub-folders",
            )
        if self.val_dataset is None and stage in (None, "fit", "validate") and len(split.val_ids):
            self.val_dataset = ImageDataset(
                split.val_ids, split.val_labels, self.image_dir, self.build_eval_transform(), gldv2_image_path
            )

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        split = self.split
        return {
            "version": STATE_VERSION,
            "csv": os.path.basename(self.csv_path),
            "split_file": split.split_file,
            "num_classes": split.num_classes,
            "landmark_ids": [int(x) for x in split.landmark_ids],
            "min_images_per_class": self.min_images_per_class,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "data_seed": self.data_seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_class_mapping(state_dict)
        self.restore_data_seed(state_dict)
        saved_split = state_dict.get("split_file")
        if saved_split != self.split.split_file:
            rank_zero_warn(
                f"resuming with split file {self.split.split_file!r}, the checkpoint used {saved_split!r}: "
                "validation images may differ from (or overlap) the ones trained on before"
            )

    def check_class_mapping(self, state_dict: dict[str, Any]) -> None:
        if "landmark_ids" not in state_dict:
            raise ClassMappingError(
                f"checkpoint's datamodule state has no 'landmark_ids' (keys: {sorted(state_dict)}); "
                "it was not saved by GLDv2DataModule"
            )
        saved = np.asarray(state_dict["landmark_ids"], dtype=np.int64)
        current = self.split.landmark_ids
        if len(saved) != len(current) or not np.array_equal(saved, current):
            where = ""
            n = min(len(saved), len(current))
            diff = np.flatnonzero(saved[:n] != current[:n])
            if len(diff):
                i = int(diff[0])
                where = f"; first difference at label {i}: checkpoint landmark {saved[i]}, data landmark {current[i]}"
            raise ClassMappingError(
                f"the checkpoint's class mapping does not match the data: checkpoint has {len(saved)} classes "
                f"(csv {state_dict.get('csv')!r}, min_images_per_class={state_dict.get('min_images_per_class')}), "
                f"the data has {len(current)} (csv {os.path.basename(self.csv_path)!r}, "
                f"min_images_per_class={self.min_images_per_class}){where}"
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(csv={self.csv_path!r}, image_dir={self.image_dir!r}, "
            f"min_images_per_class={self.min_images_per_class}, val_fraction={self.val_fraction}, seed={self.seed})"
        )
