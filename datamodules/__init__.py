"""LightningDataModules, datasets and image pipelines."""

from .collate import SkipFailedCollate, collate_skip_failed, format_failed, split_failed
from .classification import ClassMappingError, ImageClassificationDataModule
from .gldv2 import GLDv2DataModule
from .gldv2_index import (
    GLDv2CSVError,
    GLDv2Split,
    SplitFileError,
    build_gldv2_split,
    gldv2_image_path,
    read_gldv2_csv,
)
from .image_dataset import ImageDataset, worker_init_fn
from .labelled import LabelledImagesDataModule
from .labelled_index import LabelledDataError
from sg_train.image_io import ImageReadError, read_image
from .transforms import build_eval_transform, build_train_transform, resolve_normalization

__all__ = [
    "ClassMappingError",
    "GLDv2CSVError",
    "GLDv2DataModule",
    "GLDv2Split",
    "ImageClassificationDataModule",
    "ImageDataset",
    "ImageReadError",
    "LabelledDataError",
    "LabelledImagesDataModule",
    "SkipFailedCollate",
    "SplitFileError",
    "build_eval_transform",
    "build_gldv2_split",
    "build_train_transform",
    "collate_skip_failed",
    "format_failed",
    "gldv2_image_path",
    "read_gldv2_csv",
    "read_image",
    "resolve_normalization",
    "split_failed",
    "worker_init_fn",
]
