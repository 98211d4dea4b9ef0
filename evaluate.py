#!/usr/bin/env python
"""Evaluate image-retrieval descriptors on a Revisited Oxford/Paris-format benchmark.

    python evaluate.py --descriptors Q.npy X.npy --gnd gnd_roxford5k.pkl [--rerank] [--json out.json]

Q.npy holds the query descriptors (one row per query, in qimlist order), X.npy the database
descriptors (imlist order); both L2-normalised, fp16/fp32 (X is memory-mapped, so an R1M-size
database works). Prints the paper's table (E/M/H mAP in %, without and with SuperGlobal
reranking) and optionally writes ``{"<dataset>": {"mAP": {"E", "M", "H"}, "rerank_mAP": {...},
"mP": ..., "rerank_mP": ...}}`` with values in [0, 1]; the dataset name comes from the
gnd file name (gnd_<name>.pkl). Any error: one line on stderr and exit status 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import numpy as np

from sg_train.retrieval import BACKENDS, INDEX_TYPES, dataset_name, evaluate_descriptors, format_results_table, load_gnd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py", description="Revisited Oxford/Paris mAP (E/M/H), with and without SuperGlobal reranking.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--descriptors", nargs=2, metavar=("Q.npy", "X.npy"),
                        help="query and database descriptors (.npy, rows in qimlist / imlist order)")
    parser.add_argument("--gnd", metavar="FILE", help="ground truth gnd_<name>.pkl (needed with --descriptors)")
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
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{what} file {path} is not a plain .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{what} file {path} is not a single .npy array")
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise ValueError(f"{what} file {path} must hold a 2-D float array, got shape {arr.shape} dtype {arr.dtype}")
    return arr


def evaluate_descriptor_files(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    q_path, x_path = args.descriptors
    if not os.path.isfile(args.gnd):
        raise FileNotFoundError(f"ground-truth file not found: {args.gnd}")
    gnd = load_gnd(args.gnd)
    Q = _load_matrix(q_path, "query descriptor", mmap=False)
    X = _load_matrix(x_path, "database descriptor", mmap=True)
    res = evaluate_descriptors(Q, X, gnd, rerank=args.rerank, M=args.M, K=args.K, beta=args.beta,
                               backend=args.backend, topk=args.topk, faiss_index=args.faiss_index)
    return {dataset_name(args.gnd): res}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None  # a protocol without any query that has positives
    return value


def results_json(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    keys = ("mAP", "rerank_mAP", "mP", "rerank_mP")
    return {name: {k: _jsonable(res[k]) for k in keys if k in res} for name, res in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.descriptors is not None and args.gnd is None:
        parser.error("--descriptors needs --gnd FILE")
    try:
        results = evaluate_descriptor_files(args)
        print(format_results_table(results))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results_json(results), fh, indent=2)
                fh.write("\n")
    except Exception as exc:  # any failure: one clear line, non-zero status
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"evaluate.py: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
