"""Train on your own labelled photos: class folders or an OML-style CSV (see
:mod:`datamodules.labelled_index` for both formats and the held-out split).

The classes are the data's, by name: ``num_classes``, ``class_counts`` (training images) and
``class_names`` go to the model (``train.py`` links them) and every checkpoint stores the names.
The held-out images are validated twice: classification accuracy/GAP as for GLDv2, and, through
:meth:`LabelledImagesDataModule.retrieval_benchmark`, as a query/gallery retrieval benchmark
(leave-one-out unless the CSV marks ``is_query``/``is_gallery``) that
:class:`~callbacks.retrieval_eval.RetrievalEvalCallback` scores with mAP@k, recall@k and MAP@R.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sg_train.errors import OptionError

from .classification import ClassMappingError, ImageClassificationDataModule
from .image_dataset import ImageDataset, pixel_box
from .labelled_index import (
    LabelledDataError,
    LabelledImages,
    drop_unreadable,
    load_held_out_split,
    read_class_folders,
    read_labelled_csv,
)
from .revisited import EvalImageDataset, read_image_sizes

__all__ = ["LabelledBenchmark", "LabelledImagesDataModule"]


STATE_VERSION = 1
BENCHMARK_NAME = "held_out"


@dataclass
class LabelledBenchmark:
    """A labelled query/gallery benchmark (no ground-truth file).

    Attributes: ``name``; ``queries``/``gallery`` (:class:`~datamodules.revisited.EvalImageDataset`);
    ``query_labels``/``gallery_labels`` int64 class indices; ``query_gallery_ids`` int64
    ``(num_queries,)``: the gallery index of the same image for each query, -1 where the query is
    not in the gallery (it is left out of its own ranking).
    """

    name: str
    queries: EvalImageDataset
    gallery: EvalImageDataset
    query_labels: np.ndarray
    gallery_labels: np.ndarray
    query_gallery_ids: np.ndarray


class LabelledImagesDataModule(ImageClassificationDataModule):
    """Your labelled photos, from class folders (``images``) or a CSV (``csv``).

    Args:
        images: ``<images>/<class name>/<image>`` folder (give this or ``csv``).
        csv: an OML-style CSV ``path,label[,split,is_query,is_gallery,x_1,y_1,x_2,y_2]``.
        image_root: folder the CSV's relative paths start from (default: the CSV's folder).
        val_fraction: held-out fraction per class when the data gives no ``split`` (see
            :func:`~datamodules.labelled_index.held_out_count`: at least two of every class of
            four or more); 0: nothing held out (no validation, no retrieval benchmark).
        split_file: where the drawn held-out split is written and then reused; default
            ``<folder>/.sg-train/held_out_<data digest>_f<fraction>_seed<seed>.json`` beside the data.
        seed: seed of the held-out draw.
        **kwargs: image sizes, batch sizes, loader settings, preprocessing and augmentations:
            see :class:`~datamodules.classification.ImageClassificationDataModule`.

    Raises :class:`~sg_train.errors.OptionError` when neither or both of ``images``/``csv`` are
    given or ``val_fraction`` is outside [0, 1); reading the data raises
    :class:`~datamodules.labelled_index.LabelledDataError` naming the item at fault.
    """

    def __init__(
        self,
        images: str | None = None,
        csv: str | None = None,
        image_root: str | None = None,
        val_fraction: float = 0.2,
        split_file: str | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if (images is None) == (csv is None):
            raise OptionError("give data.images (a folder of class folders) or data.csv (path,label rows), not "
                              f"{'both' if images is not None else 'neither'}")
        if not 0 <= val_fraction < 1:
            raise OptionError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        if image_root is not None and csv is None:
            raise OptionError("data.image_root goes with data.csv (class folders are their own root)")
        self.images_dir = None if images is None else os.fspath(images)
        self.csv = None if csv is None else os.fspath(csv)
        self.image_root = image_root
        self.val_fraction = float(val_fraction)
        self.split_file = split_file
        self.seed = int(seed)
        self._data: LabelledImages | None = None
        self._held_out: np.ndarray | None = None

    # ------------------------------------------------------------------ index (lazy)

    @property
    def data(self) -> LabelledImages:
        """Every readable labelled image, read on first access (every header is read once, so a file
        that is no image never reaches an epoch; the skipped items are reported once)."""
        if self._data is None:
            data = read_labelled_csv(self.csv, self.image_root) if self.csv else read_class_folders(self.images_dir)
            data = drop_unreadable(data, progress=len(data) >= 10_000)
            for reason, items in data.skipped.items():
                rank_zero_warn(f"{data.source}: skipped {len(items)} {reason}, e.g. {items[:3]}")
            self._data = data
        return self._data

    @property
    def held_out(self) -> np.ndarray:
        """``(N,)`` bool: the held-out images (the data's ``split`` column, or the seeded draw)."""
        if self._held_out is None:
            data = self.data
            if data.split is not None:
                self._held_out = data.split
            elif self.val_fraction == 0:
                self._held_out = np.zeros(len(data), dtype=bool)
            else:
                self._held_out, self.split_file = load_held_out_split(data, self.val_fraction, self.seed, self.split_file)
        return self._held_out

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def class_counts(self) -> torch.Tensor:
        """Training images per class index, ``long`` ``(num_classes,)``; see :meth:`_training_counts`."""
        return torch.from_numpy(self._training_counts())

    def _training_counts(self) -> np.ndarray:
        """Training images per class; raises :class:`LabelledDataError` naming the classes that have
        none (all held out): training needs an image of every class (a benchmark of the held-out
        photos does not)."""
        counts = np.bincount(self.data.labels[~self.held_out], minlength=self.num_classes).astype(np.int64)
        untrained = [self.data.class_names[c] for c in np.flatnonzero(counts == 0)]
        if untrained:
            raise LabelledDataError(f"{self.data.source}: classes {untrained[:5]} have no training image (all held "
                                    "out); every class needs at least one training image")
        return counts

    @property
    def class_names(self) -> list[str]:
        return list(self.data.class_names)

    # ------------------------------------------------------------------ Lightning hooks

    def _dataset(self, rows: np.ndarray, transform) -> ImageDataset:
        data = self.data
        boxes = None if data.boxes is None else data.boxes[rows]
        return ImageDataset([data.paths[i] for i in rows], data.labels[rows], data.root, transform, boxes=boxes)

    def setup(self, stage: str | None = None) -> None:
        self.adopt_trainer_model()
        held_out = self.held_out
        if self.train_dataset is None and stage in (None, "fit"):
            self._training_counts()
            rows = np.flatnonzero(~held_out)
            self.train_dataset = self._dataset(rows, self.build_train_transform())
            single = int((np.bincount(self.data.labels, minlength=self.num_classes) == 1).sum())
            rank_zero_info(
                f"{self.data.source}: {self.num_classes} classes, {len(rows)} training and {int(held_out.sum())} "
                f"held-out images" + (f"; {single} classes of one image are trained on, not evaluated" if single else "")
            )
            self.check_training_set(self.train_dataset, source=self.data.source,
                                    layout_hint=f"the images were listed from {self.data.source}; were they moved?")
        if self.val_dataset is None and stage in (None, "fit", "validate") and held_out.any():
            self.val_dataset = self._dataset(np.flatnonzero(held_out), self.build_eval_transform())

    def decodable(self, rows: np.ndarray, left_out_of: str) -> np.ndarray:
        """``rows`` (int indices into :attr:`data`) without the images that cannot be decoded whole.

        The data check read headers only; an image evaluated every epoch is decoded once here, so one
        cut short or damaged after its header is left out (a warning names it and ``left_out_of``)
        instead of stopping an evaluation. Progress bar from 2000 images.
        """
        rows = np.asarray(rows, dtype=np.int64)
        _, broken = read_image_sizes([self.data.path(i) for i in rows], decode=True, progress=len(rows) >= 2000)
        if broken:
            items = [f"{self.data.paths[rows[k]]}: {reason}" for k, reason in sorted(broken.items())]
            rank_zero_warn(f"{self.data.source}: {len(items)} image(s) cannot be decoded and are left out of "
                           f"{left_out_of}: {items[:5]}")
        return np.delete(rows, sorted(broken))

    def retrieval_benchmark(self, *, mean, std, input_format: str, protocol) -> LabelledBenchmark | None:
        """The held-out images as a query/gallery benchmark, prepared as ``protocol`` and the model say.

        Queries: the held-out images marked ``is_query`` (all of them when the data does not say);
        gallery: those marked ``is_gallery`` (all). Boxes crop as in training. None when nothing
        is held out. Files that are no image and boxes outside their image were dealt with when the
        data was read (:func:`~datamodules.labelled_index.drop_unreadable`, headers only); here every
        held-out image is decoded whole once, and one that cannot be (cut short, damaged after its
        header) is left out of the benchmark with a warning naming it, never trained on either (the
        split, and so the resume check, stay as they were).
        """
        data = self.data
        rows = np.flatnonzero(self.held_out)
        if not len(rows):
            return None
        rows = self.decodable(rows, f"the {BENCHMARK_NAME} benchmark (and out of training)")
        paths = [data.path(i) for i in rows]
        is_query = np.ones(len(rows), bool) if data.is_query is None else data.is_query[rows]
        is_gallery = np.ones(len(rows), bool) if data.is_gallery is None else data.is_gallery[rows]
        if not is_query.any() or not is_gallery.any():
            raise LabelledDataError(f"{data.source}: the validation rows mark {int(is_query.sum())} queries and "
                                    f"{int(is_gallery.sum())} gallery images; a benchmark needs both")
        sizes = data.sizes[rows]
        boxes = [pixel_box(data.boxes[i]) if data.boxes is not None else None for i in rows]

        def part(mask: np.ndarray) -> EvalImageDataset:
            chosen = np.flatnonzero(mask)
            dataset = EvalImageDataset([paths[k] for k in chosen], [boxes[k] for k in chosen], mean=mean, std=std,
                                       input_format=input_format, protocol=protocol)
            dataset._set_source_sizes(sizes[chosen])
            dataset.name = BENCHMARK_NAME
            return dataset

        gallery_position = np.cumsum(is_gallery) - 1
        query_rows = np.flatnonzero(is_query)
        return LabelledBenchmark(
            name=BENCHMARK_NAME,
            queries=part(is_query),
            gallery=part(is_gallery),
            query_labels=data.labels[rows][is_query],
            gallery_labels=data.labels[rows][is_gallery],
            query_gallery_ids=np.where(is_gallery[query_rows], gallery_position[query_rows], -1).astype(np.int64),
        )

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "source": self.data.source,
            "class_names": self.class_names,
            "split_file": self.split_file,
            "held_out_digest": self.held_out_digest(),
            "data_digest": self.data.digest(),
            "data_seed": self.data_seed,
        }

    def held_out_digest(self) -> str:
        """SHA-256 of the held-out images' paths: which photos are evaluated, never trained on."""
        held = sorted(p for p, m in zip(self.data.paths, self.held_out) if m)
        return hashlib.sha256("\n".join(held).encode()).hexdigest()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_class_mapping(state_dict)
        self.restore_data_seed(state_dict)
        if state_dict.get("data_digest") != self.data.digest():
            rank_zero_warn(f"resuming on {self.data.source}, whose images changed since the checkpoint (same classes); "
                           "held-out images may differ from before")

    def check_class_mapping(self, state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint of other classes, or of another held-out split: a resumed run whose
        held-out photos changed would evaluate photos it trained on, or compare numbers of two splits."""
        self._check_classes(state_dict)
        saved = state_dict.get("held_out_digest")
        if saved is not None and saved != self.held_out_digest():
            raise LabelledDataError(
                f"{self.data.source}: the held-out photos differ from the checkpoint's (photos were added, removed or "
                f"renamed since; split file {state_dict.get('split_file')!r}): resuming would evaluate photos the run "
                "trained on. Put the photos back as they were to resume, or start a new run from the checkpoint with "
                "model.init_from=<checkpoint>"
            )

    def _check_classes(self, state_dict: dict[str, Any]) -> None:
        saved = list(state_dict.get("class_names") or [])
        current = self.class_names
        if saved != current:
            first = next((i for i, (a, b) in enumerate(zip(saved, current)) if a != b), min(len(saved), len(current)))
            raise ClassMappingError(
                f"the checkpoint's classes do not match the data: checkpoint has {len(saved)} classes (from "
                f"{state_dict.get('source')!r}), the data has {len(current)} ({self.data.source!r}); first difference "
                f"at class {first}: checkpoint {saved[first] if first < len(saved) else None!r}, data "
                f"{current[first] if first < len(current) else None!r}. To train on other classes start a new run "
                "with model.init_from=<checkpoint> instead of resuming"
            )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({'csv=' + repr(self.csv) if self.csv else 'images=' + repr(self.images_dir)}, "
                f"val_fraction={self.val_fraction}, seed={self.seed})")
