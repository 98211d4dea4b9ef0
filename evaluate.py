#!/usr/bin/env python
"""Evaluate image retrieval on Revisited Oxford/Paris-format benchmarks (+ R1M distractors).

    python evaluate.py --descriptors Q.npy X.npy --gnd gnd_roxford5k.pkl [--rerank] [--json out.json]
    python evaluate.py --checkpoint runs/demo/checkpoints/last.ckpt --data-root data/synthetic/revisited \
        --datasets rsynth [--protocol revisitop|superglobal] [--rerank] [--json out.json]
    python evaluate.py --cvnet-weights CVPR2022_CVNet_R101.pyth --depth 101 --data-root data/revisitop \
        --datasets roxford5k rparis6k --relu-plus --rgem --gemp --sgem --rerank [--r1m data/revisitop1m]

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
each dataset's ``--json`` entry as ``"eval_protocol"``.

Descriptor mode:

Q.npy holds the query descriptors (one row per query, in qimlist order), X.npy the database
descriptors (imlist order); both L2-normalised, fp16/fp32 (X is memory-mapped, so an R1M-size
database works). Prints the paper's table (E/M/H mAP in %, without and with SuperGlobal
reranking) and optionally writes ``{"<dataset>": {"mAP": {"E", "M", "H"}, "rerank_mAP": {...},
"mP": ..., "rerank_mP": ...}}`` with values in [0, 1]; the dataset name comes from the
gnd file name (gnd_<name>.pkl). Bad input: one line on stderr and exit status 1; a bug: its traceback.
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
from sg_train.errors import UserInputError, user_error_line  # noqa: E402
from sg_train.eval_protocols import EVAL_PROTOCOLS, EvalProtocol, resolve_protocol  # noqa: E402
from sg_train.extraction import bind_protocol, extract_all  # noqa: E402
from sg_train.files import write_json  # noqa: E402
from sg_train.inference import model_from_checkpoint, model_from_cvnet  # noqa: E402
from sg_train.model import EmbeddingModel  # noqa: E402
from sg_train.r1m_extraction import R1MDescriptors, R1MExtractionError, extract_r1m  # noqa: E402
from sg_train.retrieval import (  # noqa: E402
    BACKENDS,
    INDEX_TYPES,
    check_rerank_params,
    dataset_name,
    evaluate_descriptors,
    format_results_table,
    load_gnd,
)


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
    parser.add_argument("--rerank", action="store_true", help="also report SuperGlobal reranking")
    parser.add_argument("--json", metavar="FILE", help="write the numbers (values in [0, 1]) to this JSON file")
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="search backend (default: torch)")
    parser.add_argument("--faiss-index", choices=INDEX_TYPES, default="flat",
                        help="FAISS index for --backend faiss (default: exact flat)")
    parser.add_argument("--topk", type=int, default=1000,
                        help="items ranked explicitly per query; the rest are placed exactly by counting")
    parser.add_argument("--M", type=int, default=400, help="reranking: top-M reordered (default 400)")
    parser.add_argument("--K", type=int, default=9, help="reranking: neighbours besides itself (default 9)")
    parser.add_argument("--beta", type=float, default=0.15, help="reranking: neighbour weight (default 0.15)")
    return parser


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


def evaluate_descriptor_files(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    q_path, x_path = args.descriptors
    if not os.path.isfile(args.gnd):
        raise FileNotFoundError(f"ground-truth file not found: {args.gnd}")
    gnd = load_gnd(args.gnd)
    Q = _load_matrix(q_path, "query descriptor", mmap=False)
    X = _load_matrix(x_path, "database descriptor", mmap=True)
    if args.rerank:  # before the search: a database too small for K fails at once
        check_rerank_params(X.shape[0], args.M, args.K, args.beta, what=f"database descriptor file {x_path}")
    res = evaluate_descriptors(Q, X, gnd, rerank=args.rerank, M=args.M, K=args.K, beta=args.beta,
                               backend=args.backend, topk=args.topk, faiss_index=args.faiss_index)
    return {dataset_name(args.gnd): res}


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


def evaluate_model(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    protocol = protocol_of(args)
    model = load_model(args)
    extractor = bind_protocol(model, protocol)  # refuses a model whose colours contradict the protocol
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    extractor.to(device)
    print(f"evaluation protocol: {protocol.summary()}", flush=True)
    preprocessing = {"mean": model.mean, "std": model.std, "input_format": model.input_format, "protocol": protocol}
    extraction = {"batch_size": args.batch_size, "num_workers": args.num_workers, "device": device,
                  "progress": not args.no_progress}
    cache = DescriptorCache(args.cache_dir, dtype="float16" if args.cache_fp16 else "float32") if args.cache_dir else None
    fingerprint = model_fingerprint(model) if cache is not None else None

    def descriptors(dataset: RevisitedDataset) -> torch.Tensor:
        def compute() -> torch.Tensor:
            return extract_all(extractor, dataset, desc=f"{dataset.name} {dataset.split}", **extraction)

        if cache is None:
            return compute()
        return cache.get_or_compute(descriptor_key(fingerprint, dataset, protocol), compute)

    benchmarks = {}
    for name in args.datasets:  # every benchmark read (and its reranking checked) before any extraction
        queries = RevisitedDataset(args.data_root, name, "query", **preprocessing)
        database = RevisitedDataset(args.data_root, name, "database", **preprocessing)
        if args.rerank:
            check_rerank_params(len(database), args.M, args.K, args.beta, what=f"{name} ({database.gnd_path})")
        benchmarks[name] = queries, database

    r1m = None
    if args.r1m:  # the bound model: R1M items carry no protocol, and its fingerprint names the protocol
        out = Path(args.r1m_out or Path(args.cache_dir) / f"r1m-{model_fingerprint(extractor)[:16]}")
        try:  # finished before: skip reading a million image headers
            r1m = R1MDescriptors.open(out, model=extractor)
        except R1MExtractionError:
            distractors = R1MDataset(args.r1m, **preprocessing, progress=not args.no_progress)
            r1m = extract_r1m(extractor, distractors, out, **extraction)
    results: dict[str, dict[str, Any]] = {}
    search = {"rerank": args.rerank, "M": args.M, "K": args.K, "beta": args.beta, "backend": args.backend,
              "topk": args.topk, "faiss_index": args.faiss_index}
    recorded = {"eval_protocol": protocol.describe()}
    for name, (queries, database) in benchmarks.items():
        Q, X = descriptors(queries), descriptors(database)
        results[name] = {**evaluate_descriptors(Q, X, queries.gnd, **search), **recorded}
        if r1m is not None:
            with tempfile.TemporaryDirectory(dir=r1m.out_dir) as scratch:
                combined = with_distractors(X, r1m, Path(scratch) / "database+r1m.npy")
                results[f"{name}+r1m"] = {**evaluate_descriptors(Q, combined, queries.gnd["gnd"], **search), **recorded}
                del combined
    return results


def results_json(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The numbers of ``results`` that go to ``--json``, with the evaluation protocol of model mode
    (``"eval_protocol"``: every setting, see :meth:`EvalProtocol.describe`). NaN, for an E/M/H
    protocol without any query that has positives, is written as null by :func:`sg_train.files.write_json`."""
    keys = ("mAP", "rerank_mAP", "mP", "rerank_mP", "eval_protocol")
    return {name: {k: res[k] for k in keys if k in res} for name, res in results.items()}


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
    try:
        results = evaluate_descriptor_files(args) if args.descriptors else evaluate_model(args)
        print(format_results_table(results))
        if args.json:
            write_json(args.json, results_json(results))
    except Exception as exc:
        line = user_error_line(exc)  # re-raises a bug with its traceback
        print(f"evaluate.py: error: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
