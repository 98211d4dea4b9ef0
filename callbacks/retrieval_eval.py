"""Retrieval validation during training, with and without SuperGlobal reranking, every N epochs
(docs/design.md §4, §8): Revisited Oxford/Paris E/M/H mAP, and, for your own labelled photos, the
held-out split as a query/gallery benchmark scored with pytorch-metric-learning's metrics.

Under DDP each rank extracts whole batches of a shared batch plan and the descriptors are
all-gathered, so the numbers equal a single-process run's to the last digit.

Everything that could make an evaluation fail is checked at setup, before the first training
step: each ground truth, every query and database image header, and the rerank parameters
against each database's size. Should an evaluation still fail during ``fit``, the trained
weights are saved to ``last.ckpt`` first and the error says how to continue. The evaluation
history is part of the callback's checkpoint state, so ``results.json`` and the final table
survive a resume.
"""
from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.last_checkpoint import LastCheckpoint
from datamodules.labelled import BENCHMARK_NAME
from datamodules.revisited import RevisitedDataset
from sg_train.descriptor_cache import model_fingerprint
from sg_train.eval_protocols import resolve_protocol
from sg_train.errors import OptionError, UserInputError
from sg_train.extraction import extract_descriptors, gather_descriptors
from sg_train.figures import example_grid, example_strip, plot_retrieval_history, query_thumbnail
from sg_train.files import write_json
from sg_train.retrieval import (
    PROTOCOLS,
    check_rerank_params,
    evaluate_descriptors,
    evaluate_labelled,
    format_results_table,
    labelled_metric_names,
    required_rank_columns,
)
from sg_train.retrieval.examples import (
    LABELLED_RELEVANCE,
    REVISITED_RELEVANCE,
    QueryExample,
    labelled_examples,
    revisited_examples,
    select_queries,
)
from sg_train.run_folder import CHECKPOINT_DIR, CURVES_FILE, EXAMPLES_DIR, LAST_CHECKPOINT, RESULTS_FILE

RESULTS_FORMAT = "sg-train/retrieval-results"
RESULTS_VERSION = 4  # 3: every evaluation records its "eval_protocol"; 4: stage "untrained" is "before_training"


class RetrievalEvaluationError(RuntimeError):
    """A retrieval evaluation that failed during ``fit`` (the trained weights were saved first)."""


#: the parts of a result kept in results.json: Revisited E/M/H, or labelled-set metrics
RESULT_KEYS = ("mAP", "rerank_mAP", "metrics", "rerank_metrics")


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"mAP": {E, M, H}, "rerank_mAP": {...}}`` averaged over the Revisited datasets (absent
    without one), plus ``per_dataset`` (each dataset's E/M/H or labelled-set metrics)."""
    summary: dict[str, Any] = {}
    for key in ("mAP", "rerank_mAP"):
        having = [r[key] for r in results.values() if key in r]
        if having:
            summary[key] = {p: sum(r[p] for r in having) / len(having) for p in PROTOCOLS}
    summary["per_dataset"] = {name: {k: r[k] for k in RESULT_KEYS if k in r} for name, r in results.items()}
    return summary


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """A dataset's result as ``{metric: value}``: ``mAP_E``, ``rerank_mAP_H``, ... for a Revisited
    dataset; ``mAP@10``, ``rerank_MAP@R``, ... for a labelled benchmark."""
    flat = {}
    for key in ("mAP", "rerank_mAP"):
        for protocol, value in result.get(key, {}).items():
            flat[f"{key}_{protocol}"] = float(value) if value is not None else float("nan")
    for key, prefix in (("metrics", ""), ("rerank_metrics", "rerank_")):
        for name, value in result.get(key, {}).items():
            if name != "num_queries_scored":
                flat[prefix + name] = float(value)
    return flat


class RetrievalEvalCallback(Callback):
    """Log ``retrieval/<dataset>/mAP_{E,M,H}`` and ``retrieval/<dataset>/rerank_mAP_{E,M,H}`` for
    Revisited-format datasets, and ``retrieval/held_out/{precision@1, recall@k, mAP@k, MAP@R,
    R-precision}`` (and ``rerank_...``) for the datamodule's held-out split.

    Runs at the end of validation every ``every_n_epochs`` epochs (and in ``trainer.validate``);
    when the run has no validation loop it runs at the end of the training epoch instead. The
    metrics can be a ``ModelCheckpoint`` monitor (give it the same ``every_n_epochs``).

    Args:
        data_root: folder holding ``<name>/gnd_<name>.pkl`` and ``<name>/jpg/``.
        datasets: dataset names under ``data_root`` (``roxford5k``, ``rparis6k``, ``rsynth``, ...).
        held_out: also evaluate the datamodule's held-out split as a query/gallery benchmark
            named ``held_out`` (a datamodule with ``retrieval_benchmark()``, e.g.
            :class:`~datamodules.labelled.LabelledImagesDataModule`): leave-one-out unless the data
            marks queries and gallery; labels decide relevance (no ground-truth file).
        ks: the k of recall@k and mAP@k on labelled benchmarks.
        protocol: evaluation protocol (``sg_train/eval_protocols.py``): "revisitop" (default: the
            benchmark's rounded crop, scales 1/√2, 1, √2 with antialias, the model's colours) or
            "superglobal" (SuperGlobal's published test code: ``int()`` crop, scales 0.7071, 1,
            1.4142 without antialias; the model must normalise colours as CVNet does).
        scales: extraction scales (Scale-GeM over them when the head has ``sgem``); None: the
            protocol's; others make the protocol "custom".
        rerank: also rank with SuperGlobal reranking (``M``, ``K``, ``beta``).
        max_size: longest image side after shrinking; None: the protocol's (full size); a cap
            makes the protocol "custom".
        evaluate_before_training: also evaluate the model as fitting starts, before any step (the
            untrained model, or the starting checkpoint of a fine-tuning run): stage "before_training".
        examples: how many queries of each dataset to show at every evaluation (0: none), spread
            evenly over its query list so that epochs and runs show the same ones: their top
            ``examples_k`` results before and after reranking, framed by relevance, with the
            query's AP (:mod:`sg_train.retrieval.examples`). Drawn as
            ``<run folder>/retrieval_examples/<dataset>/<stage>_epoch<NNN>.png`` and, with a
            ``WandbLogger``, logged as the ``wandb.Table`` ``retrieval_examples/<dataset>``.
        examples_k: results shown per example query.
        log_descriptors: at the end of ``fit``, log the last evaluation's descriptors of each
            dataset as a W&B artifact of type ``dataset`` (``queries.npy``, ``database.npy`` and the
            Revisited ground truth, the input of ``evaluate.py --descriptors``, or a labelled set's
            label arrays), with the epoch, the protocol and the model fingerprint in its metadata.
            Without an enabled W&B logger it warns and logs nothing.

    Raises :class:`~sg_train.eval_protocols.ProtocolError` at construction for an unknown protocol
    or bad scales/max_size, and at setup when the protocol fixes colours the model contradicts.

    During ``fit`` every evaluation is appended to ``<run folder>/results.json``
    (``trainer.default_root_dir``)::

        {"format": "sg-train/retrieval-results", "version": 4,
         "evaluations": [{"stage": "before_training" | "trained", "epoch": e, "global_step": s,
                          "eval_protocol": {"name", "base", "bbx_rounding", "scales", ...},
                          "mAP": {E, M, H}, "rerank_mAP": {...}, "per_dataset": {name: {...}}}, ...],
         "before_training": <its evaluation>, "trained": <the latest trained evaluation>}

    (top-level numbers averaged over datasets, in [0, 1]; a protocol without any query that has
    positives is ``null``). Each evaluation also prints one line per dataset.
    """

    def __init__(
        self,
        data_root: str | None = None,
        datasets: list[str] | None = None,
        every_n_epochs: int = 1,
        scales: Sequence[float] | None = None,
        rerank: bool = True,
        M: int = 400,
        K: int = 9,
        beta: float = 0.15,
        batch_size: int = 16,
        num_workers: int = 2,
        max_size: int | None = None,
        evaluate_before_training: bool = False,
        progress: bool = True,
        protocol: str = "revisitop",
        held_out: bool = False,
        ks: list[int] = (1, 5, 10),
        examples: int = 8,
        examples_k: int = 5,
        log_descriptors: bool = False,
    ) -> None:
        if every_n_epochs < 1:
            raise OptionError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if not datasets and not held_out:
            raise OptionError("RetrievalEvalCallback needs dataset names (datasets, under data_root) or held_out=true")
        if datasets and data_root is None:
            raise OptionError(f"datasets {list(datasets)} need data_root, the folder that holds them")
        if not ks or any(int(k) < 1 for k in ks):
            raise OptionError(f"ks must be positive integers, got {list(ks)}")
        if examples < 0 or examples_k < 1:
            raise OptionError(f"examples must be >= 0 and examples_k >= 1, got examples={examples}, "
                              f"examples_k={examples_k}")
        self.data_root = None if data_root is None else Path(data_root)
        self.datasets = list(datasets or [])
        self.held_out = bool(held_out)
        self.ks = tuple(int(k) for k in ks)
        self.every_n_epochs = every_n_epochs
        self.protocol = resolve_protocol(protocol, scales=scales, max_size=max_size)
        self.rerank = rerank
        self.M, self.K, self.beta = M, K, beta
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.evaluate_before_training = evaluate_before_training
        self.progress = progress
        self.examples, self.examples_k = int(examples), int(examples_k)
        self.log_descriptors = bool(log_descriptors)
        self.history: list[dict[str, Any]] = []
        self._evaluated_epoch: int | None = None
        # name -> (queries, database or None when it is the queries, scorer(Q, X) -> result)
        self._datasets: dict[str, tuple[Any, Any, Callable[[torch.Tensor, torch.Tensor], dict[str, Any]]]] = {}
        # name -> examples(Q, X) -> list[QueryExample]; and the latest evaluation's (Q, X)
        self._examplers: dict[str, Callable[[torch.Tensor, torch.Tensor], list[QueryExample]]] = {}
        self._descriptors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._labels: dict[str, dict[str, np.ndarray]] = {}  # labelled benchmarks: their label arrays

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for logger in trainer.loggers if trainer.is_global_zero else ():
            if isinstance(logger, WandbLogger):  # every retrieval metric: higher is better, its best in the summary
                logger.experiment.define_metric("retrieval/*", summary="max,last")
        model = pl_module.model
        preprocessing = {"mean": model.mean, "std": model.std, "input_format": model.input_format, "protocol": self.protocol}
        rerank = {"rerank": self.rerank, "M": self.M, "K": self.K, "beta": self.beta}
        for name in self.datasets:  # read and check everything now, not after an epoch of training
            queries = RevisitedDataset(self.data_root, name, "query", **preprocessing)
            database = RevisitedDataset(self.data_root, name, "database", **preprocessing)
            database.source_sizes()  # every database image header (queries are read at construction)
            if self.rerank:
                check_rerank_params(len(database), self.M, self.K, self.beta, what=f"the {name} database")
            self._datasets[name] = (queries, database, functools.partial(evaluate_descriptors, gnd=queries.gnd, **rerank))
            self._examplers[name] = functools.partial(
                revisited_examples, gnd=queries.gnd, queries=select_queries(len(queries), self.examples),
                k=min(self.examples_k, len(database)), **rerank)
        if self.held_out:
            self._setup_held_out(trainer, preprocessing, rerank)
        if stage == "fit":
            self._check_checkpoint_monitors(trainer)

    def metric_names(self) -> list[str]:
        """Every ``retrieval/<dataset>/<metric>`` this callback logs, as configured."""
        revisited = [f"mAP_{p}" for p in PROTOCOLS]
        labelled = labelled_metric_names(self.ks)
        names = []
        for dataset, metrics in [(name, revisited) for name in self.datasets] + (
                [(BENCHMARK_NAME, labelled)] if self.held_out else []):
            names += [f"retrieval/{dataset}/{m}" for m in metrics]
            names += [f"retrieval/{dataset}/rerank_{m}" for m in metrics] if self.rerank else []
        return names

    def _check_checkpoint_monitors(self, trainer: pl.Trainer) -> None:
        """Before the first step: a checkpoint monitoring a ``retrieval/`` metric this callback does
        not log would stop the run at its first save, after an epoch of training, having saved nothing."""
        logged = self.metric_names()
        for callback in trainer.checkpoint_callbacks:
            monitor = getattr(callback, "monitor", None)
            if monitor and monitor.startswith("retrieval/") and monitor not in logged:
                raise OptionError(
                    f"{type(callback).__name__}(monitor={monitor!r}) watches a metric this run never logs: the "
                    f"retrieval callback logs {', '.join(logged[:6])}{' ...' if len(logged) > 6 else ''}; monitor "
                    "one of them (edit the ModelCheckpoint entry in a copy of the config), or evaluate that dataset"
                )

    def _setup_held_out(self, trainer: pl.Trainer, preprocessing: dict[str, Any], rerank: dict[str, Any]) -> None:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "retrieval_benchmark"):
            raise OptionError(f"held_out=true evaluates the datamodule's held-out split, but {type(datamodule).__name__} "
                              "has none (use datamodules.labelled.LabelledImagesDataModule, or name Revisited datasets)")
        bench = datamodule.retrieval_benchmark(**preprocessing)
        if bench is None:
            raise UserInputError("held_out=true, but the data holds nothing out (data.val_fraction=0 and no validation "
                                 "rows): set data.val_fraction, or drop held_out")
        if required_rank_columns(bench.query_labels, bench.gallery_labels, self.ks,
                                 query_gallery_ids=bench.query_gallery_ids) == 0:
            raise UserInputError(f"{bench.name}: no held-out query has another image of its class in the gallery, so "
                                 "retrieval cannot be scored; hold out more images (data.val_fraction) or give classes "
                                 "more images (a class of four or more has two held out)")
        in_gallery = int((bench.query_gallery_ids >= 0).any())
        if self.rerank:
            check_rerank_params(len(bench.gallery) - in_gallery, self.M, self.K, self.beta,
                                what=f"the {bench.name} gallery")
        same = bench.queries.paths == bench.gallery.paths and bench.queries.boxes == bench.gallery.boxes
        scorer = functools.partial(evaluate_labelled, query_labels=bench.query_labels, gallery_labels=bench.gallery_labels,
                                   query_gallery_ids=bench.query_gallery_ids, ks=self.ks, **rerank)
        self._datasets[bench.name] = (bench.queries, None if same else bench.gallery, scorer)
        self._labels[bench.name] = {"query_labels": bench.query_labels, "gallery_labels": bench.gallery_labels,
                                    "query_gallery_ids": bench.query_gallery_ids}
        self._examplers[bench.name] = functools.partial(
            labelled_examples, query_labels=bench.query_labels, gallery_labels=bench.gallery_labels,
            query_gallery_ids=bench.query_gallery_ids, queries=select_queries(len(bench.queries), self.examples),
            k=min(self.examples_k, len(bench.gallery) - in_gallery), **rerank)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evaluate_before_training and trainer.global_step == 0:
            results = self._evaluate_guarded(trainer, pl_module)
            if trainer.logger is not None:
                trainer.logger.log_metrics(self._metrics(results, prefix="retrieval_before_training"), step=0)
            self._record("before_training", results, trainer)
        elif self.history:  # resumed: the results file holds exactly the checkpoint's history
            self._write_results(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and (trainer.state.fn != "fit" or self._due(trainer)):
            self._evaluate_and_log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation (when the run has any) has already run this epoch; this covers runs without it.
        if self._due(trainer) and self._evaluated_epoch != trainer.current_epoch:
            self._evaluate_and_log(trainer, pl_module)

    def _due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return epoch % self.every_n_epochs == 0 or last

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.history:
            plot_retrieval_history(self.history, Path(trainer.default_root_dir) / CURVES_FILE)
            if self.log_descriptors:
                self._log_descriptors(trainer)
            blocks = {}
            for stage, entry in self._latest_by_stage().items():
                for name, result in entry["per_dataset"].items():
                    blocks[f"{name} ({stage}, epoch {entry['epoch']})"] = result
            rank_zero_info("Retrieval (%):\n" + format_results_table(blocks))

    def _evaluate_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = self._evaluate_guarded(trainer, pl_module)
        # Every rank computed the same numbers from the gathered descriptors: "max" over the ranks
        # returns them exactly (and keeps Lightning from warning about an unsynced epoch metric).
        for key, value in self._metrics(results, prefix="retrieval").items():
            pl_module.log(key, value, sync_dist=True, reduce_fx="max")
        self._evaluated_epoch = trainer.current_epoch
        self._record("trained", results, trainer)

    def _evaluate_guarded(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, Any]]:
        """:meth:`evaluate`; during ``fit`` a failure first saves the trained weights to ``last.ckpt``."""
        try:
            return self.evaluate(trainer, pl_module)
        except Exception as exc:
            if trainer.state.fn != "fit" or trainer.global_step == 0:
                raise
            path = self._checkpoint_dir(trainer) / LAST_CHECKPOINT
            trainer.save_checkpoint(path)
            where = [f"the benchmarks under {self.data_root}"] if self.datasets else []
            where += ["the held-out photos"] if self.held_out else []
            raise RetrievalEvaluationError(
                f"retrieval evaluation failed at epoch {trainer.current_epoch} (global step {trainer.global_step}): "
                f"{type(exc).__name__}: {exc}. The trained weights are saved in {path}; fix {' or '.join(where)} "
                f"and continue with --ckpt_path {path}"
            ) from exc

    @staticmethod
    def _checkpoint_dir(trainer: pl.Trainer) -> Path:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, LastCheckpoint) and cb.dirpath:
                return Path(cb.dirpath)
        return Path(trainer.default_root_dir) / CHECKPOINT_DIR

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, Any]]:
        """Extract (sharded over ranks), gather, search, rerank and score every dataset."""
        results = {}
        for name, (queries, database, score) in self._datasets.items():
            Q = self._extract(trainer, pl_module, queries, f"{name} queries")
            X = Q if database is None else self._extract(trainer, pl_module, database, f"{name} database")
            results[name] = score(Q, X)
            self._descriptors[name] = Q, X
        return results

    def _extract(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataset: Any, desc: str) -> torch.Tensor:
        indices, descriptors = extract_descriptors(
            pl_module.model,
            dataset,
            protocol=self.protocol,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=pl_module.device,
            shard=(trainer.global_rank, trainer.world_size),
            progress=self.progress and trainer.is_global_zero,
            desc=desc,
        )

        def all_gather(tensor: torch.Tensor) -> torch.Tensor:
            return pl_module.all_gather(tensor.to(pl_module.device)).cpu()

        return gather_descriptors(indices, descriptors, len(dataset), all_gather=all_gather)

    def _metrics(self, results: dict[str, dict[str, Any]], prefix: str) -> dict[str, float]:
        return {f"{prefix}/{name}/{metric}": value for name, result in results.items()
                for metric, value in flat_metrics(result).items()}

    def _record(self, stage: str, results: dict[str, dict[str, Any]], trainer: pl.Trainer) -> None:
        entry = {"stage": stage, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                 "eval_protocol": self.protocol.describe(), **summarise(results)}
        self.history.append(entry)
        for name, result in entry["per_dataset"].items():
            rank_zero_info(f"retrieval {name} ({stage}, epoch {entry['epoch']}, step {entry['global_step']}): "
                           + _one_line(result))
        if trainer.state.fn == "fit":
            self._write_results(trainer)
            self._show_examples(stage, entry, trainer)

    def _log_descriptors(self, trainer: pl.Trainer) -> None:
        """Log the last evaluation's descriptors of each dataset as a W&B artifact of type ``dataset``
        named ``descriptors-<dataset>-<run id>`` (``log_descriptors``): ``queries.npy`` and
        ``database.npy`` (float32, rows in the query / database list order), with
        ``gnd_<dataset>.pkl`` for a Revisited dataset or ``query_labels.npy``, ``gallery_labels.npy``
        and ``query_gallery_ids.npy`` for a labelled one."""
        import wandb

        latest = self.history[-1]
        fingerprint = model_fingerprint(trainer.lightning_module.model)
        runs = [logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        runs = [run for run in runs if run.settings.mode != "disabled"]
        if not runs or not self._descriptors:
            rank_zero_warn("log_descriptors=true, but no descriptors are logged: " + (
                "the run has no enabled W&B logger (WANDB_MODE=disabled or no WandbLogger)" if not runs else
                "no retrieval evaluation ran in this process (the fit was already complete)"))
            return
        for run in runs:
            for name, (Q, X) in self._descriptors.items():
                queries = self._datasets[name][0]
                metadata = {"dataset": name, "epoch": latest["epoch"], "global_step": latest["global_step"],
                            "stage": latest["stage"], "eval_protocol": latest["eval_protocol"],
                            "model_fingerprint": fingerprint, "num_queries": int(Q.shape[0]),
                            "num_database": int(X.shape[0]), "dim": int(Q.shape[1]),
                            "metrics": latest["per_dataset"].get(name)}
                artifact = wandb.Artifact(f"descriptors-{name}-{run.id}", type="dataset", metadata=metadata)
                with tempfile.TemporaryDirectory() as tmp:  # add_file copies each file into W&B's staging
                    arrays = {"queries": Q, "database": X}
                    gnd_path = getattr(queries, "gnd_path", None)
                    if gnd_path is not None:
                        artifact.add_file(str(gnd_path), name=Path(gnd_path).name)
                    else:
                        arrays.update(self._labels[name])
                    for key, value in arrays.items():
                        file = Path(tmp) / f"{key}.npy"
                        np.save(file, torch.as_tensor(value).float().numpy() if key in ("queries", "database")
                                else np.asarray(value))
                        artifact.add_file(str(file), name=file.name)
                run.log_artifact(artifact, aliases=[f"epoch{latest['epoch']}"])

    def _show_examples(self, stage: str, entry: dict[str, Any], trainer: pl.Trainer) -> None:
        """Draw this evaluation's example queries of every dataset (``examples``) into the run folder
        and, with a ``WandbLogger``, log them as the table ``retrieval_examples/<dataset>``."""
        if not self.examples or not trainer.is_global_zero:
            return
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        when = f"{stage}, epoch {entry['epoch']}, step {entry['global_step']}"
        for name, (queries, database, _) in self._datasets.items():
            examples = self._examplers[name](*self._descriptors[name])
            gallery = queries if database is None else database
            path = Path(trainer.default_root_dir) / EXAMPLES_DIR / name / f"{stage}_epoch{entry['epoch']:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            legend = LABELLED_RELEVANCE if name in self._labels else REVISITED_RELEVANCE
            example_grid(examples, queries.paths, queries.boxes, gallery.paths, title=f"{name} ({when})",
                         legend=legend).save(path)
            for logger in loggers:
                columns, rows = _example_table(examples, queries, gallery, stage, entry["epoch"])
                logger.log_table(f"retrieval_examples/{name}", columns=columns, data=rows, step=trainer.global_step)

    def _write_results(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        write_json(Path(trainer.default_root_dir) / RESULTS_FILE, {"format": RESULTS_FORMAT, "version": RESULTS_VERSION,
                                                                  "evaluations": self.history, **self._latest_by_stage()})

    def _latest_by_stage(self) -> dict[str, dict[str, Any]]:
        """``{"before_training": ..., "trained": ...}``: the last evaluation of each stage, in that order."""
        return {entry["stage"]: entry for entry in self.history}


def _example_table(examples: list[QueryExample], queries: Any, gallery: Any, stage: str,
                   epoch: int) -> tuple[list[str], list[list[Any]]]:
    """The ``wandb.Table`` columns and rows of ``examples``: the query (its box outlined), its top-k
    before and after reranking as strips framed by relevance, the relevance words, the APs."""
    import wandb

    ap_names = list(examples[0].ap) if examples else []
    reranked = bool(examples) and examples[0].rerank_ranks is not None
    columns = ["stage", "epoch", "query", "query image", "results", "relevance", *(f"AP {a}" for a in ap_names)]
    if reranked:
        columns += ["results reranked", "relevance reranked", *(f"rerank AP {a}" for a in ap_names)]
    rows = []
    for e in examples:
        row = [stage, epoch, Path(queries.paths[e.query]).name,
               wandb.Image(query_thumbnail(queries.paths[e.query], queries.boxes[e.query])),
               wandb.Image(example_strip([gallery.paths[r] for r in e.ranks], e.relevance)),
               " ".join(e.relevance), *(e.ap[a] for a in ap_names)]
        if reranked:
            row += [wandb.Image(example_strip([gallery.paths[r] for r in e.rerank_ranks], e.rerank_relevance)),
                    " ".join(e.rerank_relevance), *(e.rerank_ap[a] for a in ap_names)]
        rows.append(row)
    return columns, rows


def _one_line(result: dict[str, Any]) -> str:
    """``mAP E/M/H 60.00/45.00/20.00 | rerank mAP E/M/H ...`` or, for a labelled benchmark,
    ``P@1 90.00 R@5 ... mAP@10 ... MAP@R ... | rerank ...`` (in %)."""
    parts = [f"{label} E/M/H {_emh(result[key])}" for key, label in (("mAP", "mAP"), ("rerank_mAP", "rerank mAP"))
             if key in result]
    for key, label in (("metrics", ""), ("rerank_metrics", "rerank ")):
        if key in result:
            parts.append(label + " ".join(f"{name} {100 * value:.2f}" for name, value in result[key].items()
                                          if name != "num_queries_scored"))
    return " | ".join(parts)


def _emh(values: dict[str, float]) -> str:
    return "/".join("n/a" if value is None or value != value else f"{100 * value:.2f}" for value in
                    (values.get(p) for p in PROTOCOLS))
