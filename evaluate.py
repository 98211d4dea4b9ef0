#!/usr/bin/env python
"""Evaluate image retrieval on Revisited Oxford/Paris-format benchmarks (+ R1M distractors).

    python evaluate.py --descriptors Q.npy X.npy --gnd gnd_roxford5k.pkl [--rerank] [--json out.json]
    python evaluate.py --checkpoint runs/demo/checkpoints/last.ckpt --data-root data/synthetic/revisited \
        --datasets rsynth [--protocol revisitop|superglobal] [--rerank] [--json out.json]
    python evaluate.py --cvnet-weights CVPR2022_CVNet_R101.pyth --depth 101 --data-root data/revisitop \
        --datasets roxford5k rparis6k --relu-plus --rgem --gemp --sgem --rerank [--r1m data/revisitop1m]
    python evaluate.py --descriptors Q.npy X.npy --gnd gnd_roxford5k.pkl --rerank --M 100 400 --K 3 9 \
        [--qe-n 0 2 --dba-n 0 2] [--wandb PROJECT]

Model mode preprocesses and extracts under an evaluation protocol (``sg_train/eval_protocols.py``):
``superglobal`` (SuperGlobal's published test code: ``int()`` query crop, scales 0.7071/1/1.4142
resized bilinear without antialias, full resolution, CVNet's colours) is the default with
``--cvnet-weights``; ``revisitop`` (the benchmark's PIL crop, which rounds; sg-train's scales
1/√2, 1, √2 with antialias; the model's colours) is the default with ``--checkpoint``, as in the
training callback. ``--scales``/``--max-size`` that differ from the protocol's make it ``custom``
(recorded with its base). Descriptors are multi-scale (Scale-GeM over the scales when the head
has it), cached with ``--cache-dir`` (keyed by model, protocol and data, reused while all are
unchanged); with ``--r1m`` the R1M distractors go into a resumable fp16 memory map and
``<dataset>+r1m`` is reported too. ``--relu-plus --rgem --gemp --sgem`` switch SuperGlobal's
components on. The protocol is printed above the table and written, with every setting, into
each dataset's ``--json`` entry as ``"eval_protocol"``, the model's fingerprint (the descriptor
cache's key, ``sg_train/descriptor_cache.py``) as ``"model_fingerprint"``.

Descriptor mode:

Q.npy holds the query descriptors (one row per query, in qimlist order), X.npy the database
descriptors (imlist order); both L2-normalised, fp16/fp32 (X is memory-mapped, so an R1M-size
database works); a row whose L2 norm is not 1 (within 1e-3, 1e-2 for fp16) is refused, naming
it. Prints the paper's table (E/M/H mAP in %, without and with SuperGlobal reranking) and
optionally writes ``{"<dataset>": {"mAP": {"E", "M", "H"}, "rerank_mAP": {...}, "mP": ...,
"rerank_mP": ...}}`` with values in [0, 1]; the dataset name comes from the
gnd file name (gnd_<name>.pkl). Bad input: one line on stderr and exit status 1; a bug: its traceback.

Post-processing and grids:

``--dba-n``/``--dba-alpha`` (αDBA on the database), ``--qe-n``/``--qe-alpha`` (αQE on the queries
from their first ranking), both off by default (n = 0), then the search, then SuperGlobal reranking
of the top M with ``--rerank`` (``sg_train/retrieval/sweep.py``: the order, and αQE/αDBA of
Radenović et al., TPAMI 2019). ``--M``, ``--K``, ``--beta`` and the four αQE/αDBA options take
several values: every combination is a point of one grid, evaluated on the same descriptors
(loaded or extracted once; the search and the numbers without reranking once per αDBA/αQE
setting). Every point is checked before any extraction or search. One point prints the table
above; a grid prints one row per point (``*``: the best, by the mean over the datasets of the
Medium mAP of the final ranking) and ``--json`` writes ``{"format": "sg-train/sweep", "best",
"points": [{"params", "score", "results": {<dataset>: ... as above}}]}``. ``--wandb [PROJECT]``
logs every point as one row of one W&B run (mode: ``sg_train/wandb_mode.py``; ``WANDB_RUN_ID``,
as a sweep agent sets it, joins that run); ``configs/sweeps/rerank.yaml`` is a W&B sweep over it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI at import otherwise

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datamodules.r1m import R1MDataset  # noqa: E402
from datamodules.revisited import RevisitedDataset  # noqa: E402
from sg_train.descriptor_cache import DescriptorCache, descriptor_key, model_fingerprint  # noqa: E402
from callbacks.retrieval_eval import flat_metrics  # noqa: E402
from sg_train.errors import OptionError, UserInputError, user_error_line  # noqa: E402
from sg_train.eval_protocols import EVAL_PROTOCOLS, EvalProtocol, resolve_protocol  # noqa: E402
from sg_train.extraction import bind_protocol, extract_all  # noqa: E402
from sg_train.figures import example_grid  # noqa: E402
from sg_train.run_folder import check_writable_dir  # noqa: E402
from sg_train.retrieval.examples import revisited_examples, select_queries  # noqa: E402
from sg_train.devices import resolve_device  # noqa: E402
from sg_train.files import why_not_a_folder, write_json  # noqa: E402
from sg_train.inference import model_from_checkpoint, model_from_cvnet  # noqa: E402
from sg_train.model import EmbeddingModel  # noqa: E402
from sg_train.r1m_extraction import R1MDescriptors, R1MExtractionError, extract_r1m  # noqa: E402
from sg_train.retrieval import (  # noqa: E402
    BACKENDS,
    INDEX_TYPES,
    SWEEP_PARAMS,
    RetrievalInputError,
    SweepPoint,
    best_point,
    check_sweep_point,
    dataset_name,
    evaluate_sweep,
    format_results_table,
    format_sweep_table,
    load_gnd,
    sweep_points,
    sweep_score,
)
from sg_train.retrieval.tail import check_against_gnd  # noqa: E402
from sg_train.wandb_mode import resolve_wandb_mode  # noqa: E402

#: what ``--json`` keeps of a dataset's result
RESULT_KEYS = ("mAP", "rerank_mAP", "mP", "rerank_mP", "eval_protocol", "model_fingerprint")
#: the options that say where the descriptors come from (the W&B run's ``source``)
SOURCE_OPTIONS = ("descriptors", "gnd", "checkpoint", "cvnet_weights", "depth", "data_root", "datasets", "r1m",
                  "relu_plus", "rgem", "gemp", "sgem")
SWEEP_FORMAT, SWEEP_VERSION = "sg-train/sweep", 1
SCORE = "mean over the datasets of the Medium mAP of the final ranking (after reranking with --rerank)"
#: the options naming a folder evaluate.py writes into (created if missing)
OUTPUT_FOLDERS = ("cache_dir", "r1m_out", "examples_dir")
#: rows of a --descriptors file read at once by the unit-length check (X may be an R1M-size memory map)
NORM_CHECK_ROWS = 16384


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py", description="Revisited Oxford/Paris mAP (E/M/H), with and without SuperGlobal reranking.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--descriptors", nargs=2, metavar=("Q.npy", "X.npy"),
                        help="query and database descriptors (.npy, rows in qimlist / imlist order)")
    source.add_argument("--checkpoint", metavar="X.ckpt", help="an sg-train checkpoint (train.py)")
    source.add_argument("--cvnet-weights", metavar="FILE", help="CVNet weights (what SuperGlobal evaluates); needs --depth")
    parser.add_argument("--gnd", metavar="FILE", help="ground truth gnd_<name>.pkl (needed with --descriptors)")
    model = parser.add_argument_group("model mode (--checkpoint / --cvnet-weights)")
    model.add_argument("--depth", type=int, choices=(50, 101), help="CVNet ResNet depth")
    model.add_argument("--data-root", metavar="DIR", help="folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/")
    model.add_argument("--datasets", nargs="+", metavar="NAME", help="e.g. roxford5k rparis6k")
    model.add_argument("--r1m", metavar="DIR", help="revisitop1m folder (revisitop1m.txt + jpg/): add the 1M distractors")
    model.add_argument("--r1m-out", metavar="DIR",
                       help="where the R1M descriptors go (resumable; default <cache-dir>/r1m-<model fingerprint>)")
    model.add_argument("--protocol", choices=sorted(EVAL_PROTOCOLS),
                       help="evaluation protocol: query crop, scales and their resize, size cap, colours of a "
                            "published evaluation (default: superglobal with --cvnet-weights, revisitop with "
                            "--checkpoint)")
    model.add_argument("--scales", nargs="+", type=float,
                       help="extraction scales (default: the protocol's; others make the protocol 'custom')")
    model.add_argument("--max-size", type=int,
                       help="shrink images so the longest side is at most this (default: the protocol's, full "
                            "size; a cap makes the protocol 'custom')")
    model.add_argument("--relu-plus", action="store_true", help="SuperGlobal ReLU+ (ResNets)")
    model.add_argument("--rgem", action="store_true", help="add Regional-GeM to the head")
    model.add_argument("--gemp", action="store_true", help="pool with GeM+ (p = 4.6)")
    model.add_argument("--sgem", action="store_true", help="aggregate the scales with Scale-GeM")
    model.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    model.add_argument("--batch-size", type=int, default=16, help="images per batch (equal-size images are batched)")
    model.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="image-loading workers (default: CPU count, at most 4)")
    model.add_argument("--cache-dir", metavar="DIR", help="cache descriptors here, keyed by model and data")
    model.add_argument("--cache-fp16", action="store_true", help="store cached descriptors as float16")
    model.add_argument("--no-progress", action="store_true", help="no progress bars")
    model.add_argument("--examples-dir", metavar="DIR",
                       help="draw what the model retrieves for a few queries of each dataset into DIR/<dataset>.png: "
                            "top-k before and after reranking, framed by relevance, with each query's AP")
    model.add_argument("--examples", type=int, default=8, metavar="N",
                       help="queries drawn per dataset, spread evenly over the query list (default 8)")
    model.add_argument("--examples-k", type=int, default=5, metavar="K", help="results drawn per query (default 5)")
    parser.add_argument("--rerank", action="store_true", help="also report SuperGlobal reranking")
    parser.add_argument("--json", metavar="FILE",
                        help="write the numbers (values in [0, 1]) to this JSON file (its folder created if missing)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="search backend (default: torch)")
    parser.add_argument("--faiss-index", choices=INDEX_TYPES, default="flat",
                        help="FAISS index for --backend faiss (default: exact flat)")
    parser.add_argument("--topk", type=int, default=1000,
                        help="items ranked explicitly per query; the rest are placed exactly by counting")
    grid = parser.add_argument_group(
        "post-processing and reranking; several values make a grid of every combination, on the same descriptors",
        "order: αDBA on the database, αQE on the queries from their first ranking, the search, SuperGlobal "
        "reranking of its top M (--rerank); αQE/αDBA: Radenović et al., TPAMI 2019")
    grid.add_argument("--M", nargs="+", type=int, default=[400], help="reranking: top-M reordered (default 400)")
    grid.add_argument("--K", nargs="+", type=int, default=[9], help="reranking: neighbours besides itself (default 9)")
    grid.add_argument("--beta", nargs="+", type=float, default=[0.15],
                      help="reranking: neighbour weight (default 0.15)")
    grid.add_argument("--qe-n", nargs="+", type=int, default=[0], metavar="N",
                      help="αQE: top-N database items added to each query (default 0: off; e.g. 2)")
    grid.add_argument("--qe-alpha", nargs="+", type=float, default=[3.0], metavar="A",
                      help="αQE: exponent of their similarity weights (default 3)")
    grid.add_argument("--dba-n", nargs="+", type=int, default=[0], metavar="N",
                      help="αDBA: each database item becomes the weighted sum of its top-N neighbours, itself "
                           "first (default 0: off; e.g. 2)")
    grid.add_argument("--dba-alpha", nargs="+", type=float, default=[3.0], metavar="A",
                      help="αDBA: exponent of their similarity weights (default 3)")
    tracking = parser.add_argument_group("W&B")
    tracking.add_argument("--wandb", nargs="?", const="", metavar="PROJECT",
                       help="log every point (parameters and metrics) as one row of one W&B run, in PROJECT "
                            "(default: WANDB_PROJECT); WANDB_MODE decides online/offline/disabled, WANDB_RUN_ID "
                            "(set by a sweep agent) joins that run")
    tracking.add_argument("--wandb-entity", help="W&B entity (team or user)")
    tracking.add_argument("--wandb-name", help="W&B run name")
    tracking.add_argument("--wandb-group", help="W&B run group")
    return parser


def grid_points(args: argparse.Namespace) -> list[SweepPoint]:
    """The grid of the options: every combination of their values (:func:`sweep_points`)."""
    return sweep_points(rerank=args.rerank, **{name: getattr(args, name) for name in SWEEP_PARAMS})


def point_options(point: SweepPoint) -> str:
    """The options that select ``point`` alone, e.g. ``--qe-n 2 --qe-alpha 3.0 --M 400 --K 9 --beta 0.15``."""
    shown = {name: value for name, value in point.params().items() if value is not None}
    for off in ("dba_n", "qe_n"):
        if shown.get(off) == 0:
            del shown[off]
    return " ".join(f"--{name.replace('_', '-')} {value}" for name, value in shown.items())


def check_points(points: list[SweepPoint], num_database: int, what: str) -> None:
    """Every point against a database of ``num_database`` images (``what``), before any extraction
    or search; :class:`OptionError` names the point's options, the bad value and the fix."""
    for point in points:
        try:
            check_sweep_point(point, num_database, what=what)
        except RetrievalInputError as exc:
            raise OptionError(f"{point_options(point)}: {exc}") from None


def _load_matrix(path: str, what: str, mmap: bool) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    size = os.path.getsize(path)
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError) as exc:
        state = "is empty (0 bytes)" if size == 0 else f"({size:,} bytes) is not a plain .npy array ({exc})"
        raise UserInputError(f"{what} file {path} {state}; it should be one 2-D float array written by numpy.save: "
                         "write it again") from None
    if not isinstance(arr, np.ndarray):
        raise UserInputError(f"{what} file {path} is not a single .npy array")
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise UserInputError(f"{what} file {path} must hold a 2-D float array, got shape {arr.shape} dtype {arr.dtype}")
    return arr


def unit_norm_tolerance(dtype: np.dtype) -> float:
    """How far a ``--descriptors`` row's L2 norm may be from 1: 1e-3, or 1e-2 for float16 (each of
    its values keeps a rounding error of up to 2^-11 of itself)."""
    return 1e-2 if np.dtype(dtype).itemsize <= 2 else 1e-3


def check_unit_rows(matrix: np.ndarray, path: str, what: str) -> None:
    """:class:`UserInputError` naming ``path``, the first row whose L2 norm is not 1 (within
    :func:`unit_norm_tolerance`) and that norm: the global search ranks by angle alone, but
    SuperGlobal reranking mixes similarities and would change silently.

    Rows that are all zero or hold nan/inf are left to the retrieval checks, which name them. Read
    :data:`NORM_CHECK_ROWS` at a time (``matrix`` may be a memory map).
    """
    tolerance = unit_norm_tolerance(matrix.dtype)
    for start in range(0, matrix.shape[0], NORM_CHECK_ROWS):
        norms = np.linalg.norm(np.asarray(matrix[start:start + NORM_CHECK_ROWS], dtype=np.float64), axis=1)
        bad = np.flatnonzero(np.isfinite(norms) & (norms > 0) & (np.abs(norms - 1) > tolerance))
        if bad.size:
            raise UserInputError(
                f"{what} file {path}: row {start + int(bad[0])} has L2 norm {norms[bad[0]]:.6g}, not 1 (tolerance "
                f"{tolerance:g} for {matrix.dtype}); descriptors must be unit length (SuperGlobal reranking weighs "
                "the similarities): L2-normalise every row, e.g. A / np.linalg.norm(A, axis=1, keepdims=True), and "
                "save the file again")


def check_output_paths(args: argparse.Namespace) -> None:
    """Before any work: each folder option (:data:`OUTPUT_FOLDERS`) is or can be made a folder, and
    ``--json`` is not a folder and its folder can be one; :class:`OptionError` naming the option,
    the path and the fix (:func:`sg_train.files.why_not_a_folder`)."""
    for name in OUTPUT_FOLDERS:
        path = getattr(args, name)
        why = why_not_a_folder(path) if path else None
        if why is not None:
            option = f"--{name.replace('_', '-')}"
            raise OptionError(f"{option} {path} {why}; give {option} a folder (created if missing)")
    if args.json:
        path = Path(args.json)
        if path.is_dir():
            raise OptionError(f"--json {path} is a folder; give --json a file name, e.g. {path / 'results.json'}")
        why = why_not_a_folder(path.parent)
        if why is not None:
            raise OptionError(f"--json {path}: its folder {path.parent} {why}; give --json a file in a folder")


def search_options(args: argparse.Namespace) -> dict[str, Any]:
    """The search settings of the options, as :func:`evaluate_sweep` takes them."""
    return {"backend": args.backend, "topk": args.topk, "faiss_index": args.faiss_index}


def evaluate_descriptor_files(args: argparse.Namespace, points: list[SweepPoint]) -> dict[str, list[dict[str, Any]]]:
    """``{dataset: [one result per point]}`` for the ``--descriptors`` files, loaded once."""
    q_path, x_path = args.descriptors
    if not os.path.isfile(args.gnd):
        raise FileNotFoundError(f"ground-truth file not found: {args.gnd}")
    gnd = load_gnd(args.gnd)
    Q = _load_matrix(q_path, "query descriptor", mmap=False)
    X = _load_matrix(x_path, "database descriptor", mmap=True)
    check_against_gnd(Q, X, gnd)  # shapes and counts first: a row of another width has another norm
    check_points(points, X.shape[0], what=f"database descriptor file {x_path}")  # before the search
    check_unit_rows(Q, q_path, "query descriptor")
    check_unit_rows(X, x_path, "database descriptor")
    return {dataset_name(args.gnd): evaluate_sweep(Q, X, gnd, points, **search_options(args))}


def protocol_of(args: argparse.Namespace) -> EvalProtocol:
    """The run's protocol: ``--protocol`` (default superglobal for CVNet weights, where the published
    protocol exists; revisitop for sg-train checkpoints, the training callback's default, so the numbers
    continue a run's history), made "custom" by ``--scales``/``--max-size`` that differ from it."""
    name = args.protocol or ("superglobal" if args.cvnet_weights else "revisitop")
    return resolve_protocol(name, scales=args.scales, max_size=args.max_size)


def load_model(args: argparse.Namespace) -> EmbeddingModel:
    switches = {"rgem": args.rgem, "gemp": args.gemp, "sgem": args.sgem, "relu_plus": args.relu_plus}
    if args.checkpoint:
        return model_from_checkpoint(args.checkpoint, **switches)
    return model_from_cvnet(args.cvnet_weights, args.depth, **switches)


def with_distractors(X: torch.Tensor, r1m: R1MDescriptors, path: Path) -> np.memmap:
    """The database followed by the R1M rows that hold a descriptor, as one fp16 memory map at ``path``."""
    valid = r1m.valid_indices
    rows = X.shape[0] + len(valid)
    combined = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, X.shape[1]))
    combined[: X.shape[0]] = X.numpy().astype(np.float16)
    step = 65536
    for start in range(0, len(valid), step):
        combined[X.shape[0] + start : X.shape[0] + start + step] = r1m.descriptors[valid[start : start + step]]
    combined.flush()
    return np.load(path, mmap_mode="r")


def evaluate_model(args: argparse.Namespace, points: list[SweepPoint]) -> dict[str, list[dict[str, Any]]]:
    """``{dataset: [one result per point]}`` (and ``<dataset>+r1m`` with ``--r1m``), each dataset's
    descriptors extracted once (or read from ``--cache-dir``); every result records the protocol
    and the model's fingerprint."""
    protocol = protocol_of(args)
    model = load_model(args)
    extractor = bind_protocol(model, protocol)  # refuses a model whose colours contradict the protocol
    device = resolve_device(args.device)
    extractor.to(device)
    print(f"evaluation protocol: {protocol.summary()}", flush=True)
    preprocessing = {"mean": model.mean, "std": model.std, "input_format": model.input_format, "protocol": protocol}
    extraction = {"batch_size": args.batch_size, "num_workers": args.num_workers, "device": device,
                  "progress": not args.no_progress}
    cache = DescriptorCache(args.cache_dir, dtype="float16" if args.cache_fp16 else "float32") if args.cache_dir else None
    fingerprint = model_fingerprint(model)

    def descriptors(dataset: RevisitedDataset) -> torch.Tensor:
        def compute() -> torch.Tensor:
            return extract_all(extractor, dataset, desc=f"{dataset.name} {dataset.split}", **extraction)

        if cache is None:
            return compute()
        return cache.get_or_compute(descriptor_key(fingerprint, dataset, protocol), compute)

    benchmarks = {}
    for name in args.datasets:  # every benchmark read (and every point checked) before any extraction
        queries = RevisitedDataset(args.data_root, name, "query", **preprocessing)
        database = RevisitedDataset(args.data_root, name, "database", **preprocessing)
        check_points(points, len(database), what=f"{name} ({database.gnd_path})")
        benchmarks[name] = queries, database

    r1m = None
    if args.r1m:  # the bound model: R1M items carry no protocol, and its fingerprint names the protocol
        out = Path(args.r1m_out or Path(args.cache_dir) / f"r1m-{model_fingerprint(extractor)[:16]}")
        try:  # finished before: skip reading a million image headers
            r1m = R1MDescriptors.open(out, model=extractor)
        except R1MExtractionError:
            distractors = R1MDataset(args.r1m, **preprocessing, progress=not args.no_progress)
            r1m = extract_r1m(extractor, distractors, out, **extraction)
    results: dict[str, list[dict[str, Any]]] = {}
    recorded = {"eval_protocol": protocol.describe(), "model_fingerprint": fingerprint}

    def evaluate(Q, X, gnd) -> list[dict[str, Any]]:
        return [{**res, **recorded} for res in evaluate_sweep(Q, X, gnd, points, **search_options(args))]

    for name, (queries, database) in benchmarks.items():
        Q, X = descriptors(queries), descriptors(database)
        results[name] = evaluate(Q, X, queries.gnd)
        if args.examples_dir:
            draw_examples(args, points[0], name, queries, database, Q, X)
        if r1m is not None:
            with tempfile.TemporaryDirectory(dir=r1m.out_dir) as scratch:
                combined = with_distractors(X, r1m, Path(scratch) / "database+r1m.npy")
                results[f"{name}+r1m"] = evaluate(Q, combined, queries.gnd["gnd"])
                del combined
    return results


def draw_examples(args: argparse.Namespace, point: SweepPoint, name: str, queries: RevisitedDataset,
                  database: RevisitedDataset, Q: torch.Tensor, X: torch.Tensor) -> Path:
    """``--examples-dir``: the example grid of ``name`` (the training callback's picture) at
    ``<examples-dir>/<name>.png``, reranked with ``point``'s setting when it reranks."""
    rerank = {"rerank": point.reranks, **({"M": point.M, "K": point.K, "beta": point.beta} if point.reranks else {})}
    examples = revisited_examples(Q, X, queries.gnd, select_queries(len(queries), args.examples),
                                  k=min(args.examples_k, len(database)), **rerank)
    path = Path(args.examples_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    title = f"{name} ({args.checkpoint or args.cvnet_weights})"
    example_grid(examples, queries.paths, queries.boxes, database.paths, title=title).save(path)
    print(f"wrote {path}", flush=True)
    return path


def results_json(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The numbers of ``results`` (``{dataset: one point's result}``) that go to ``--json``, with
    the evaluation protocol (``"eval_protocol"``: every setting, see :meth:`EvalProtocol.describe`)
    and ``"model_fingerprint"`` of model mode. NaN, for an E/M/H protocol without any query that
    has positives, is written as null by :func:`sg_train.files.write_json`."""
    return {name: {k: res[k] for k in RESULT_KEYS if k in res} for name, res in results.items()}


def at_point(results: dict[str, list[dict[str, Any]]], i: int) -> dict[str, dict[str, Any]]:
    """``{dataset: result}`` of point ``i``."""
    return {name: res[i] for name, res in results.items()}


def expansions(point: SweepPoint) -> str | None:
    """The line saying which of αDBA/αQE a single-point run applied, None for neither."""
    steps = [f"{name} (n={n}, alpha={alpha:g})" for name, n, alpha in
             (("αDBA", point.dba_n, point.dba_alpha), ("αQE", point.qe_n, point.qe_alpha)) if n]
    return f"before the search: {', then '.join(steps)}" if steps else None


def report(points: list[SweepPoint], results: dict[str, list[dict[str, Any]]], best: int | None) -> str:
    """The printed table: the paper's layout for one point, one row per point for a grid."""
    if len(points) == 1:
        table = format_results_table(at_point(results, 0))
        line = expansions(points[0])
        return f"{line}\n{table}" if line else table
    return f"{format_sweep_table(points, results, best)}\n* best point: {SCORE}"


def sweep_json(points: list[SweepPoint], results: dict[str, list[dict[str, Any]]], scores: list[float],
               best: int | None) -> dict[str, Any]:
    """What ``--json`` writes: for one point ``{dataset: ...}`` (:func:`results_json`, with the αDBA/αQE
    ``"params"`` when it applied one); for a grid every point with its parameters, score and results."""
    if len(points) == 1:
        out = results_json(at_point(results, 0))
        if expansions(points[0]):
            for entry in out.values():
                entry["params"] = points[0].params()
        return out
    return {"format": SWEEP_FORMAT, "version": SWEEP_VERSION, "score": SCORE, "best": best,
            "points": [{"params": point.params(), "score": scores[i], "results": results_json(at_point(results, i))}
                       for i, point in enumerate(points)]}


def point_row(i: int, point: SweepPoint, results: dict[str, list[dict[str, Any]]], score: float) -> dict[str, Any]:
    """Point ``i`` as one W&B row: ``point``, its parameters, ``<dataset>/mAP_E`` ... ``<dataset>/rerank_mAP_H``
    and ``score``."""
    row: dict[str, Any] = {"point": i, **{k: v for k, v in point.params().items() if v is not None}}
    for name, res in results.items():
        row.update({f"{name}/{metric}": value for metric, value in flat_metrics(res[i]).items()})
    row["score"] = score
    return row


def log_to_wandb(args: argparse.Namespace, mode: str, points: list[SweepPoint],
                 results: dict[str, list[dict[str, Any]]], scores: list[float], best: int | None) -> None:
    """One W&B run (``WANDB_RUN_ID`` joins that run): the evaluation in its config (source, datasets,
    protocol, model fingerprint, search, the grid's values), each point as one history row of
    ``sweep/<column>`` (:func:`point_row`), a ``sweep/points`` table of them all, and the best point's
    columns as ``best/<column>`` in the summary."""
    import wandb

    first = next(iter(results.values()))[0]
    config = {"source": {k: getattr(args, k) for k in SOURCE_OPTIONS if getattr(args, k) not in (None, False)},
              "datasets": list(results), "eval_protocol": first.get("eval_protocol"),
              "model_fingerprint": first.get("model_fingerprint"), "search": search_options(args),
              "rerank": args.rerank, "points": len(points),
              "grid": {name: getattr(args, name) for name in SWEEP_PARAMS
                       if args.rerank or name not in ("M", "K", "beta")}}
    run = wandb.init(project=args.wandb or None, entity=args.wandb_entity, name=args.wandb_name,
                     group=args.wandb_group, job_type="evaluate", mode=mode, config=config)
    rows = [point_row(i, point, results, scores[i]) for i, point in enumerate(points)]
    for row in rows:
        run.log({f"sweep/{column}": value for column, value in row.items()})
    columns = list(dict.fromkeys(column for row in rows for column in row))
    run.summary["sweep/points"] = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
    if best is not None:
        run.summary.update({f"best/{column}": value for column, value in rows[best].items()})
    run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.descriptors is not None and args.gnd is None:
        parser.error("--descriptors needs --gnd FILE")
    if args.descriptors is not None and (args.protocol or args.scales is not None or args.max_size is not None):
        parser.error("--protocol, --scales and --max-size decide how descriptors are extracted (model mode); "
                     "--descriptors files are used as they are")
    if args.descriptors is None and not (args.data_root and args.datasets):
        parser.error("--checkpoint / --cvnet-weights need --data-root DIR and --datasets NAME ...")
    if args.cvnet_weights and args.depth is None:
        parser.error("--cvnet-weights needs --depth 50|101")
    if args.r1m and not (args.r1m_out or args.cache_dir):
        parser.error("--r1m needs --r1m-out DIR or --cache-dir DIR for its 1M descriptors")
    if not args.rerank and max(len(args.M), len(args.K), len(args.beta)) > 1:
        parser.error("several --M/--K/--beta values make a grid of reranking settings: add --rerank")
    if args.wandb is None and (args.wandb_entity or args.wandb_name or args.wandb_group):
        parser.error("--wandb-entity/--wandb-name/--wandb-group need --wandb [PROJECT]")
    points = grid_points(args)
    if args.examples_dir and args.descriptors is not None:
        parser.error("--examples-dir draws the images: model mode (--checkpoint / --cvnet-weights with --data-root)")
    if args.examples_dir and (len(points) > 1 or points[0].qe_n or points[0].dba_n):
        parser.error("--examples-dir draws one setting: give single --M/--K/--beta values and no --qe-n/--dba-n")
    if args.examples < 1 or args.examples_k < 1:
        parser.error(f"--examples and --examples-k must be >= 1, got {args.examples} and {args.examples_k}")
    try:
        check_output_paths(args)
        resolve_device(args.device)  # a device that cannot work fails before the model is read
        if args.examples_dir:  # before any extraction: a folder that cannot be written fails at once
            check_writable_dir(args.examples_dir, "--examples-dir folder", "give --examples-dir a folder you can write")
        if args.wandb is not None:  # decided before any work: a bad WANDB_MODE fails at once
            wandb_mode, note = resolve_wandb_mode(offline=False)
            if note:
                print(f"evaluate.py: {note}", file=sys.stderr)
        results = evaluate_descriptor_files(args, points) if args.descriptors else evaluate_model(args, points)
        scores = [sweep_score(at_point(results, i)) for i in range(len(points))]
        best = best_point(scores)
        print(report(points, results, best))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            write_json(args.json, sweep_json(points, results, scores, best))
        if args.wandb is not None:
            log_to_wandb(args, wandb_mode, points, results, scores, best)
    except Exception as exc:
        line = user_error_line(exc)  # re-raises a bug with its traceback
        print(f"evaluate.py: error: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
