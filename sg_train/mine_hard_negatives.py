"""Mine CFCD stage 2's hard negatives: every training image's top wrong classes by the stage-1 model.

    python -m sg_train.mine_hard_negatives --config CONFIG.yaml --checkpoint STAGE1.ckpt --out DIR
        [--top-n 10] [--batch-size 64] [--num-workers N] [--device cpu|cuda] [--chunk-size N]
        [--overwrite] [--no-progress]
    torchrun --nproc_per_node 2 -m sg_train.mine_hard_negatives --config ... (the same options)

What is mined, for every training image i with class y_i (one row of the folder
:mod:`sg_train.hard_negatives` describes)::

    e_i    = the stage-1 model's embedding of the image, L2-normalised   (what the margin loss sees)
    s_ic   = cos(e_i, w_c) = e_i . w_c / |w_c|        for each class c     (LandmarkRetrievalModule.loss_fn
             (sub-centre losses: the max over the class's k centres)         .cosine: no margin, no scale)
    predicted_i     = argmax_c s_ic                                          (the top-1 class, y_i included)
    wrong_classes_i = the top_n classes c != y_i by s_ic, highest first; scores_i their s_ic (float32)

The training images are the ones ``CONFIG``'s datamodule trains on, read the way ``train.py``
reads them (its argument parser, class links and defaults; the datamodule's ``setup("fit")``):
the same images in the same order, the same class indices, the same training split: the images
stage 2 samples. The model is the checkpoint's: a :class:`~sg_train.module.LandmarkRetrievalModule`
rebuilt from its hyper-parameters, checked against the model configuration it stores and loaded
strictly; the configuration's ``model`` section is parsed (train.py's class links need it) but not
used, and its ``pretrained_weights``/``init_from`` are not read. The checkpoint's classes must be
the data's: their count, and the GLDv2 landmark id / class name of each class index where both
sides store them (as ``check_class_mapping`` compares them when a run resumes).

Images are prepared deterministically, without augmentation: the datamodule's evaluation pipeline
(:func:`datamodules.transforms.build_eval_transform`, as ``val_dataloader`` uses it) at the
training size ``data.image_size``, not ``eval_image_size``: the longest side resized to
``image_size``, pixels normalised the way the checkpoint's model says (channel order, mean, std;
``adopt_model_preprocessing``), padded bottom/right to ``image_size`` x ``image_size`` with the
mean colour. The whole image at the scale stage 2 trains at, where training sees random crops of it.
An image that cannot be read is counted, listed (``DIR/unreadable.tsv`` once the folder is
complete, and in its chunk's record) and marked: ``predicted`` -1, ``wrong_classes`` all -1,
``scores`` NaN, so stage 2 skips it (:attr:`sg_train.hard_negatives.HardNegatives.unreadable`).

The folder's fingerprints are what stage 2 recomputes before using it:
:func:`~sg_train.hard_negatives.scoring_fingerprint` of the module's ``model`` and ``loss_fn``
(the embedding weights *and* the class weights) and
:func:`~sg_train.hard_negatives.training_data_fingerprint` of the datamodule (its training image
names, class indices and class identities). The image pipeline is part of the header's ``score``:
continuing a folder at another image size or normalisation is refused, like another model or data.

Resumable: a run killed at any point (SIGKILL included) loses at most the chunks in progress; the
same command continues with the missing ones only and gives the arrays of an uninterrupted run
(with the same batch size and device: another one changes only the float summation order). A
folder of another model, data set, ``--top-n``, ``--chunk-size`` or image pipeline is refused
unless ``--overwrite``, which removes its hard negatives (header, ``chunks/``, ``unreadable.tsv``;
nothing else).

Under DDP (``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) rank r mines only the chunks
``c % WORLD_SIZE == r`` (``HardNegativeWriter.chunks_for``): every image exactly once, nothing
gathered; ``--device cuda`` is ``cuda:LOCAL_RANK``. Rank 0 sets the folder up (and ``--overwrite``s
it) before the other ranks open it, behind one barrier of a CPU (gloo) process group; a refusal
there is every rank's. Processes started by hand with ``RANK``/``WORLD_SIZE`` but without
torchrun's ``MASTER_ADDR``/``MASTER_PORT`` open the folder on their own: each writes the same
header atomically (whoever renames last, the file is whole and the same), and ``--overwrite`` is
refused there (it would delete chunks another process has written). Each rank reports its own
chunks; the rank that finds the folder complete reports the whole of it.

This command reads a training configuration, so it imports ``train.py``'s parser and the
datamodules (at run time); the folder format and the fingerprints live in
:mod:`sg_train.hard_negatives`, which imports neither. Bad input: one line on stderr, exit status 1;
a bug: its traceback.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from sg_train.errors import UserInputError, reported_error, user_error_line
from sg_train.files import atomic_write
from sg_train.hard_negatives import (
    CHUNKS,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SCORE,
    HEADER,
    HardNegativesError,
    HardNegativeWriter,
)
from sg_train.progress import progress_bar

if TYPE_CHECKING:  # the CLI parses its arguments before importing torch
    import torch
    from torch.utils.data import Dataset

    from sg_train.module import LandmarkRetrievalModule

__all__ = ["MiningError", "MiningPlan", "MiningReport", "build_parser", "check_checkpoint_classes",
           "load_stage1_module", "load_training_data", "main", "mine_chunks", "mining_dataset", "open_output",
           "plan_mining", "run", "score_batch"]

PROG = "python -m sg_train.mine_hard_negatives"
UNREADABLE = "unreadable.tsv"


class MiningError(UserInputError):
    """A mining option, checkpoint or output folder that cannot be used; the message names it and the fix."""


# ---------------------------------------------------------------------------- the data and the model
def load_training_data(config: str | os.PathLike) -> Any:
    """The datamodule ``config`` trains with, built by ``train.py``'s parser (class path, options,
    defaults and the links that give the model its classes); no trainer, logger, callback or run
    folder is made, and the model section's ``pretrained_weights``/``init_from`` are not read.

    Raises :class:`MiningError` for a missing file or a configuration ``train.py`` would refuse.
    """
    config = Path(config)
    if not config.is_file():
        raise MiningError(f"--config {config} not found: give the training configuration (YAML) whose data stage 2 "
                          "trains on, e.g. the run folder's config.yaml")
    try:
        import train  # noqa: PLC0415 - the application's parser: the data exactly as train.py reads it
    except ModuleNotFoundError as e:
        if e.name != "train":
            raise
        raise MiningError("train.py is not importable: run the command from the sg-train checkout (the folder "
                          "holding train.py), or put that folder on PYTHONPATH; it reads --config with train.py's "
                          "parser") from None
    from jsonargparse import ArgumentError  # noqa: PLC0415

    class DataOnlyCLI(train.TrainCLI):
        def before_instantiate_classes(self) -> None:  # mining writes only --out: no run folder, W&B, callbacks
            self.config.trainer.logger = False
            self.config.trainer.callbacks = None
            self.config.model.pretrained_weights = None  # the weights are the checkpoint's
            self.config.model.init_from = None

        def instantiate_trainer(self, **kwargs: Any) -> None:
            return None

    try:
        options = yaml.safe_load(config.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MiningError(f"--config {config} is not YAML ({e})") from None
    if not isinstance(options, dict):
        raise MiningError(f"--config {config} holds no configuration (a YAML mapping of train.py's options)")
    for key in ("ckpt_path", "weights_only"):  # the fit command's own options, in a run folder's config.yaml
        options.pop(key, None)
    try:
        with warnings.catch_warnings():  # args given while sys.argv holds this command's own arguments: meant so
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = DataOnlyCLI(train.LandmarkRetrievalModule, train.ImageClassificationDataModule,
                              subclass_mode_data=True, auto_configure_optimizers=False, args=options,
                              run=False, parser_kwargs={"exit_on_error": False})
    except ArgumentError as e:
        raise MiningError(f"--config {config} is not a configuration train.py accepts: {reported_error(e)}") from None
    return cli.datamodule


def _first_difference(saved: Sequence[Any], current: Sequence[Any]) -> str:
    n = min(len(saved), len(current))
    i = next((k for k in range(n) if saved[k] != current[k]), n)
    return (f"first difference at class {i}: checkpoint {saved[i] if i < len(saved) else None!r}, data "
            f"{current[i] if i < len(current) else None!r}")


def check_checkpoint_classes(checkpoint: dict[str, Any], datamodule: Any, path: str | os.PathLike) -> None:
    """Raise :class:`~sg_train.weights_io.WeightsMismatchError` when the checkpoint's classes are not
    the datamodule's: another count, or another GLDv2 landmark id / class name at some class index
    (each compared where both sides have it: the checkpoint's record, else its datamodule state)."""
    from sg_train.weights_io import WeightsMismatchError, stored_class_names, stored_landmark_ids  # noqa: PLC0415

    fix = ("; mine with the stage-1 checkpoint trained on this data (--checkpoint), or with the configuration it was "
           "trained with (--config)")
    where = f"--checkpoint {path} was trained on other classes than the --config data"
    for what, saved, current in (("landmark ids", stored_landmark_ids(checkpoint), datamodule.landmark_ids),
                                 ("class names", stored_class_names(checkpoint), datamodule.class_names)):
        if saved is not None and current is not None and list(saved) != list(current):
            raise WeightsMismatchError(f"{where}: its {len(saved)} classes' {what} are not the data's {len(current)} "
                                       f"({_first_difference(list(saved), list(current))}){fix}")
    saved_count = int(checkpoint["hyper_parameters"]["num_classes"])
    if saved_count != datamodule.num_classes:
        raise WeightsMismatchError(f"{where}: {saved_count} classes, the data has {datamodule.num_classes}{fix}")


def load_stage1_module(path: str | os.PathLike, datamodule: Any) -> LandmarkRetrievalModule:
    """The stage-1 :class:`~sg_train.module.LandmarkRetrievalModule` of checkpoint ``path``, in eval mode.

    Rebuilt from the checkpoint's hyper-parameters (without ``pretrained_weights``/``init_from``:
    every weight comes from the checkpoint) with the datamodule's classes, checked against the
    model configuration the checkpoint stores, then loaded strictly (model and class weights).
    Raises FileNotFoundError / :class:`~sg_train.weights_io.WeightsFileError` for a missing or
    unreadable file, :class:`~sg_train.weights_io.WeightsMismatchError` for other classes, another
    model configuration or weights that do not fit.
    """
    from sg_train.finetune import check_configured_as_stored  # noqa: PLC0415
    from sg_train.module import LandmarkRetrievalModule  # noqa: PLC0415
    from sg_train.weights_io import WeightsFileError, check_exact_fit, read_lightning_checkpoint  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise MiningError(f"--checkpoint {path} not found: give the stage-1 checkpoint, e.g. "
                          "runs/<stage-1 run>/checkpoints/last.ckpt")
    checkpoint = read_lightning_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or "num_classes" not in hparams or "backbone" not in hparams:
        raise WeightsFileError(f"--checkpoint {path} holds no sg-train hyper-parameters (num_classes, backbone, ...): "
                               "give a checkpoint written by train.py")
    check_checkpoint_classes(checkpoint, datamodule, path)
    accepted = inspect.signature(LandmarkRetrievalModule).parameters
    arguments = {key: value for key, value in hparams.items() if key in accepted}
    arguments.update(pretrained_weights=None, init_from=None, landmark_ids=datamodule.landmark_ids,
                     class_names=datamodule.class_names,
                     class_counts=[int(c) for c in datamodule.class_counts.tolist()])
    module = LandmarkRetrievalModule(**arguments)
    what = f"--checkpoint {path}"
    check_configured_as_stored(module.model, checkpoint, what)
    check_exact_fit(module, checkpoint["state_dict"], what)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def mining_dataset(datamodule: Any) -> tuple[Dataset, str]:
    """The datamodule's training set (after ``setup("fit")``) with its evaluation pipeline at the
    training size in place of the augmentations, and a description of that pipeline."""
    from datamodules.transforms import build_eval_transform  # noqa: PLC0415

    size = datamodule.image_size
    dataset = copy.copy(datamodule.train_dataset)  # the same names, labels, root, paths and boxes
    dataset.transform = build_eval_transform(size, pad_to_square=True, mean=datamodule.mean, std=datamodule.std,
                                             input_format=datamodule.input_format)
    mean, std = (", ".join(f"{v:g}" for v in values) for values in (datamodule.mean, datamodule.std))
    described = (f"the datamodule's evaluation pipeline at data.image_size={size}: longest side resized to {size}, "
                 f"normalised ({datamodule.input_format}, mean {mean}, std {std}), padded to {size}x{size}")
    return dataset, described


# ---------------------------------------------------------------------------- scoring
def score_batch(module: LandmarkRetrievalModule, images: torch.Tensor, labels: torch.Tensor,
                top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score a batch of prepared images against every class.

    Args:
        module: the stage-1 module (eval mode, on the images' device).
        images: float ``(B, 3, H, W)``, normalised as the model expects.
        labels: long ``(B,)``: each image's class.
        top_n: wrong classes kept (< num_classes).

    Returns ``(wrong_classes, scores, predicted)``: long ``(B, top_n)``, the classes other than the
    image's own with the highest cosine (``module.loss_fn.cosine`` of ``module(images)``: fp32, no
    margin, max over sub-centres), highest first; fp32 ``(B, top_n)`` their cosines; long ``(B,)``
    the top-1 class over all classes.
    """
    import torch  # noqa: PLC0415

    with torch.inference_mode():
        cosine = module.loss_fn.cosine(module(images))
        predicted = cosine.argmax(dim=1)
        others = cosine.scatter(1, labels[:, None], float("-inf"))
        scores, wrong = others.topk(top_n, dim=1, largest=True, sorted=True)
    return wrong, scores, predicted


class _MiningCollate:
    """:func:`datamodules.collate.collate_skip_failed`, also keeping ``(index, path, reason)`` of each
    sample whose image could not be read (picklable, for spawned workers)."""

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        from datamodules.collate import collate_skip_failed  # noqa: PLC0415

        batch = collate_skip_failed(samples)
        batch["unreadable"] = [(int(s["index"]), *s["failed"]) for s in samples if s.get("image") is None]
        return batch


@dataclass
class _Chunk:
    chunk: int
    rows: range
    wrong: np.ndarray
    scores: np.ndarray
    predicted: np.ndarray
    unreadable: list[list[Any]] = field(default_factory=list)


def mine_chunks(
    module: LandmarkRetrievalModule,
    dataset: Dataset,
    writer: HardNegativeWriter,
    chunks: Sequence[int],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_chunk_done: Callable[[int], None] | None = None,
) -> list[list[Any]]:
    """Mine ``chunks`` of ``writer``'s folder and write each as soon as its images are scored.

    Args:
        module: the stage-1 module (moved to ``device``, eval mode).
        dataset: the training set to mine (:func:`mining_dataset`), index i = image i of the folder;
            a sample's ``label`` is its class.
        writer: the open folder; ``writer.header["top_n"]`` wrong classes per image.
        chunks: the chunks to mine (e.g. ``writer.missing_chunks(rank, world_size)``).
        batch_size: images per forward pass; batches never straddle two chunks, so a chunk's rows
            do not depend on which chunks are mined with it (resumed or split over ranks alike).
        num_workers: DataLoader workers that read and prepare the images.
        device: where the model runs.
        progress: a progress bar over the images of ``chunks``.
        on_chunk_done: called with each chunk number once it is written.

    Returns ``[index, path, reason]`` of every image that could not be read (their rows: predicted
    -1, wrong classes -1, scores NaN; also in their chunk's record under "unreadable").
    """
    import torch  # noqa: PLC0415
    from torch.utils.data import DataLoader  # noqa: PLC0415

    from datamodules.image_dataset import worker_init_fn  # noqa: PLC0415

    device = torch.device(device)
    module = module.to(device).eval()
    top_n = writer.header["top_n"]
    plan = [(chunk, list(rows[s:s + batch_size]))
            for chunk in chunks for rows in [writer.chunk_range(chunk)] for s in range(0, len(rows), batch_size)]
    if not plan:
        return []
    loader = DataLoader(dataset, batch_sampler=[indices for _, indices in plan], num_workers=num_workers,
                        collate_fn=_MiningCollate(), worker_init_fn=worker_init_fn, pin_memory=device.type == "cuda")
    labels_of = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.long)
    unreadable: list[list[Any]] = []
    current: _Chunk | None = None
    total = sum(len(writer.chunk_range(c)) for c in chunks)
    with progress_bar(total=total, desc="mine hard negatives", unit="img", enabled=progress) as bar:
        for (chunk, indices), batch in zip(plan, loader):
            if current is None or current.chunk != chunk:
                rows = writer.chunk_range(chunk)
                current = _Chunk(chunk, rows, np.full((len(rows), top_n), -1, np.int64),
                                 np.full((len(rows), top_n), np.nan, np.float32), np.full(len(rows), -1, np.int64))
            current.unreadable += [[index, path, reason] for index, path, reason in batch["unreadable"]]
            if len(batch["index"]):
                labels = labels_of[batch["index"]]
                wrong, scores, predicted = score_batch(module, batch["image"].to(device, non_blocking=True),
                                                       labels.to(device), top_n)
                if not torch.isfinite(scores).all():
                    raise MiningError(f"the stage-1 model gives non-finite cosines (NaN/inf) for training images "
                                      f"{batch['index'].tolist()[:5]}: its weights have diverged; mine with an "
                                      "earlier checkpoint")
                at = (batch["index"] - current.rows.start).numpy()
                current.wrong[at], current.scores[at] = wrong.cpu().numpy(), scores.cpu().numpy()
                current.predicted[at] = predicted.cpu().numpy()
            bar.update(len(indices))
            if indices[-1] == current.rows.stop - 1:
                record = {"unreadable": current.unreadable}
                writer.write_chunk(chunk, current.wrong, current.scores, current.predicted, record=record)
                unreadable += current.unreadable
                if on_chunk_done is not None:
                    on_chunk_done(chunk)
    return unreadable


# ---------------------------------------------------------------------------- the output folder
def _distributed() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; (0, 1, 0) without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise MiningError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {os.environ.get('RANK')!r}/"
                          f"{os.environ.get('WORLD_SIZE')!r}/{os.environ.get('LOCAL_RANK')!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise MiningError(f"RANK={rank} does not lie in [0, WORLD_SIZE={world}): launch with torchrun, or unset them")
    return rank, world, local


def _cli_words(message: str) -> str:
    """The writer's advice in this command's options."""
    return (message.replace("pass overwrite=True", "pass --overwrite").replace("overwrite=True", "--overwrite")
            .replace("pass chunk_size=", "pass --chunk-size "))


def _open(out: Path, overwrite: bool, writer_args: dict[str, Any]) -> HardNegativeWriter:
    if overwrite and (out / UNREADABLE).is_file():
        (out / UNREADABLE).unlink()
    try:
        return HardNegativeWriter(out, overwrite=overwrite, **writer_args)
    except HardNegativesError as e:
        raise HardNegativesError(_cli_words(str(e))) from None


def open_output(out: str | os.PathLike, *, rank: int = 0, world_size: int = 1, overwrite: bool = False,
                **writer_args: Any) -> HardNegativeWriter:
    """Open ``out`` for this rank: rank 0 first (overwriting if asked), then the others.

    With a torch.distributed process group (torchrun) the others wait at a barrier until rank 0 has
    set the folder up, and a refusal on rank 0 is raised on every rank. Without one (``world_size``
    processes started by hand), each opens the folder on its own (the header each would write is
    the same, written atomically) and ``overwrite`` is refused when ``world_size > 1``.
    ``writer_args``: :class:`~sg_train.hard_negatives.HardNegativeWriter`'s other arguments.
    """
    out = Path(out)
    if world_size == 1:
        return _open(out, overwrite, writer_args)
    import torch.distributed as dist  # noqa: PLC0415

    if not (dist.is_available() and dist.is_initialized()):
        if overwrite:
            raise MiningError(f"--overwrite with WORLD_SIZE={world_size} processes not started by torchrun (no "
                              "MASTER_ADDR/MASTER_PORT): one would delete chunks another has written; overwrite on "
                              f"one process first, or launch with torchrun --nproc_per_node {world_size}")
        return _open(out, False, writer_args)
    failure: list[Any] = [None]
    writer = None
    if rank == 0:
        try:
            writer = _open(out, overwrite, writer_args)
        except UserInputError as e:
            failure = [str(e)]
            dist.broadcast_object_list(failure, src=0)
            raise
    dist.broadcast_object_list(failure, src=0)  # rank 0's folder is set up (or refused) before the others open it
    if failure[0] is not None:
        raise HardNegativesError(f"rank 0: {failure[0]}")
    return writer if writer is not None else _open(out, False, writer_args)


def _write_unreadable(writer: HardNegativeWriter) -> list[list[Any]]:
    """Every chunk's unreadable images, written to ``DIR/unreadable.tsv`` (index, path, reason)."""
    from datamodules.collate import format_failed  # noqa: PLC0415

    rows = [row for c in range(writer.num_chunks) for row in (writer.chunk_record(c) or {}).get("unreadable", [])]
    lines = ["index\tpath\treason"] + [f"{index}\t{format_failed(path, reason)}" for index, path, reason in rows]
    atomic_write(writer.path / UNREADABLE, lambda fh: fh.write("".join(f"{line}\n" for line in lines).encode()))
    return rows


# ---------------------------------------------------------------------------- command line
def _at_least(minimum: int):
    """An argparse ``type``: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Mine CFCD stage 2's hard negatives: for every training image of --config's data, the stage-1 "
                    "--checkpoint's top wrong classes (cosine of the embedding to each class weight) and its top-1 "
                    "class, into a resumable folder stage 2 reads (sg_train.hard_negatives). Run the same command "
                    "again after an interruption; under torchrun each rank mines its own chunks.")
    parser.add_argument("--config", required=True, metavar="CONFIG.yaml",
                        help="the training configuration whose data stage 2 trains on (train.py's YAML)")
    parser.add_argument("--checkpoint", required=True, metavar="STAGE1.ckpt",
                        help="the stage-1 checkpoint (train.py), e.g. runs/stage1/checkpoints/last.ckpt")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--top-n", type=_at_least(1), default=10, metavar="N",
                        help="wrong classes kept per image, < the class count (default 10)")
    parser.add_argument("--batch-size", type=_at_least(1), default=64, metavar="N",
                        help="images per forward pass (default 64)")
    parser.add_argument("--num-workers", type=_at_least(0), default=None, metavar="N",
                        help="DataLoader workers (default: the configuration's data.num_workers)")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="cpu or cuda (default: cuda when there is one; under torchrun cuda:LOCAL_RANK)")
    parser.add_argument("--chunk-size", type=_at_least(1), default=DEFAULT_CHUNK_SIZE, metavar="N",
                        help=f"images per chunk, the unit of resumption and of the split over ranks "
                             f"(default {DEFAULT_CHUNK_SIZE})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a folder of another mining (its header, chunks/ and unreadable.tsv)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


@dataclass(frozen=True)
class MiningReport:
    """What one process did: ``mined`` chunks and their ``images``, the ``unreadable`` ones among them,
    ``seconds`` spent mining, and the folder's state afterwards (``complete``; ``all_unreadable``:
    every unreadable image of a complete folder)."""

    out: Path
    rank: int
    world_size: int
    mined: list[int]
    images: int
    unreadable: list[list[Any]]
    seconds: float
    num_images: int
    num_chunks: int
    complete: bool
    all_unreadable: list[list[Any]] | None


@dataclass
class MiningPlan:
    """What :func:`plan_mining` settled: the ``module`` on ``device``, the ``dataset`` to mine as
    ``described``, the open ``writer`` and this process's ``chunks`` (its missing ones)."""

    module: LandmarkRetrievalModule
    dataset: Dataset
    described: str
    writer: HardNegativeWriter
    chunks: list[int]
    device: torch.device
    num_workers: int
    rank: int
    world_size: int


def plan_mining(args: argparse.Namespace, argv: Sequence[str]) -> MiningPlan:
    """Check the options, build the data and the model, open the folder: everything but the mining."""
    rank, world, local_rank = _distributed()
    out = Path(args.out)
    for option, path, example in (("--config", args.config, "the stage-1 run folder's config.yaml"),
                                  ("--checkpoint", args.checkpoint, "runs/<stage-1 run>/checkpoints/last.ckpt")):
        if not Path(path).is_file():
            what = "the training configuration (YAML)" if option == "--config" else "the stage-1 checkpoint"
            raise MiningError(f"{option} {path} not found: give {what}, e.g. {example}")
    if out.exists() and not out.is_dir():
        raise MiningError(f"--out {out} is a file, not a folder: choose a folder for the hard negatives")
    from sg_train.devices import resolve_device  # noqa: PLC0415 - torch once the arguments are read

    device = resolve_device(args.device, local_rank=local_rank, world_size=world)
    datamodule = load_training_data(args.config)
    if args.top_n >= datamodule.num_classes:
        raise MiningError(f"--top-n {args.top_n} must be below the class count {datamodule.num_classes} (the wrong "
                          f"classes of an image are the other {datamodule.num_classes - 1}); pass --top-n "
                          f"{max(1, datamodule.num_classes - 1)} or less")
    module = load_stage1_module(args.checkpoint, datamodule)
    datamodule.adopt_model_preprocessing(module.model.preprocessing)
    datamodule.setup("fit")
    dataset, described = mining_dataset(datamodule)
    from sg_train.hard_negatives import scoring_fingerprint, training_data_fingerprint  # noqa: PLC0415

    writer_args = {
        "model_fingerprint": scoring_fingerprint(module.model, module.loss_fn),
        "data_fingerprint": training_data_fingerprint(datamodule),
        "num_images": len(dataset), "num_classes": datamodule.num_classes, "top_n": args.top_n,
        "chunk_size": args.chunk_size, "score": f"{DEFAULT_SCORE}; images: {described}",
        "command": f"{PROG} {shlex.join(argv)}",
        "extra": {"checkpoint": os.path.abspath(args.checkpoint), "config": os.path.abspath(args.config),
                  "data": repr(datamodule), "images": described},
    }
    if world > 1 and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:  # torchrun
        import torch.distributed as dist  # noqa: PLC0415

        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            writer = open_output(out, rank=rank, world_size=world, overwrite=args.overwrite, **writer_args)
        finally:
            dist.destroy_process_group()  # nothing else is shared: each rank mines and writes its own chunks
    else:
        writer = open_output(out, rank=rank, world_size=world, overwrite=args.overwrite, **writer_args)
    num_workers = datamodule.num_workers if args.num_workers is None else args.num_workers
    return MiningPlan(module, dataset, described, writer, writer.missing_chunks(rank, world), device, num_workers,
                      rank, world)


def run(args: argparse.Namespace, argv: Sequence[str],
        on_chunk_done: Callable[[int], None] | None = None) -> MiningReport:
    """:func:`plan_mining`, then mine this process's missing chunks (:func:`mine_chunks`)."""
    plan = plan_mining(args, argv)
    writer = plan.writer
    images = sum(len(writer.chunk_range(c)) for c in plan.chunks)
    who = f"rank {plan.rank} of {plan.world_size}: " if plan.world_size > 1 else ""
    print(f"{PROG}: {who}{len(plan.chunks)} of {len(writer.chunks_for(plan.rank, plan.world_size))} chunks "
          f"({images} of {writer.header['num_images']} training images, {writer.header['num_classes']} classes) to "
          f"mine into {writer.path} on {plan.device}; images: {plan.described}", file=sys.stderr)
    start = time.perf_counter()
    unreadable = mine_chunks(plan.module, plan.dataset, writer, plan.chunks, batch_size=args.batch_size,
                             num_workers=plan.num_workers, device=plan.device,
                             progress=not args.no_progress and plan.rank == 0, on_chunk_done=on_chunk_done)
    seconds = time.perf_counter() - start
    complete = writer.complete
    return MiningReport(writer.path, plan.rank, plan.world_size, plan.chunks, images, unreadable, seconds,
                        writer.header["num_images"], writer.num_chunks, complete,
                        _write_unreadable(writer) if complete else None)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _summary(report: MiningReport) -> str:
    who = f"rank {report.rank} of {report.world_size}: " if report.world_size > 1 else ""
    rate = f", {report.images / report.seconds:.0f} img/s" if report.images and report.seconds > 0 else ""
    done = (f"{who}mined {_count(len(report.mined), 'chunk')} ({report.images} images{rate}, "
            f"{len(report.unreadable)} unreadable)" if report.mined else f"{who}nothing left to mine")
    if not report.complete:
        return (f"{done}; {report.out} is not complete yet: chunks of other ranks are still missing (they finish in "
                "their own processes; rerun the same command to mine whatever an interrupted run left)")
    unread = report.all_unreadable or []
    note = f", {len(unread)} unreadable (listed in {report.out / UNREADABLE})" if unread else ""
    return (f"{done}; {report.out} holds all {report.num_images} training images in "
            f"{_count(report.num_chunks, 'chunk')}{note} ({report.out / HEADER}, {report.out / CHUNKS}/)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        report = run(args, argv)
    except Exception as exc:
        line = user_error_line(exc)  # re-raises a bug with its traceback
        print(f"{PROG}: error: {line}", file=sys.stderr)
        return 1
    print(f"{PROG}: {_summary(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
