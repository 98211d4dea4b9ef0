"""Search an embedded gallery with query images.

    python -m sg_train.search --index DIR QUERY [QUERY...] [--ckpt CKPT] [--top-k 10] [--faiss] [--json]

``DIR`` is a finished ``python -m sg_train.embed`` output. The queries (files, or folders of image
files) are embedded with the checkpoint recorded in ``DIR/embed.json`` (or ``--ckpt``) under the
same evaluation protocol and scales; a checkpoint whose model fingerprint differs from the
gallery's is refused (its descriptors would not be comparable). For each query the ``top-k``
gallery files are printed with their cosine similarities (descriptors are L2-normalised, so the
inner product is the cosine, in [-1, 1]), best first. Exact search by default
(:func:`sg_train.retrieval.search`, chunked over the gallery); ``--faiss`` uses FAISS's exact flat
inner-product index (:func:`sg_train.retrieval.faiss_search`; on a GPU when faiss has GPU support).
``--json`` prints one JSON object instead (for scripts)::

    {"index": DIR, "checkpoint": CKPT, "backend": "exact"|"faiss", "top_k": k,
     "results": [{"query": path, "matches": [{"rank": 1, "file": path, "similarity": s}, ...]}, ...]}

A query file name must be valid UTF-8 (it is printed); one holding a line break needs ``--json``.

Bad input: one line on stderr and exit status 1; a bug: its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sg_train.embed import Embeddings, collect_images
from sg_train.errors import OptionError, UserInputError, user_error_line

if TYPE_CHECKING:
    from sg_train.embedder import Embedder

__all__ = ["format_results", "load_index_model", "main", "search_gallery"]


def _query_name_rule(as_json: bool) -> Callable[[str], str]:
    """The check of each query file name (``collect_images``' ``check_name``): valid UTF-8 (it is
    printed), and without a line break in the text output, one line per query and per match (JSON
    escapes it). A tab is kept: the text output separates its columns with spaces."""
    def check(path: str) -> str:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise UserInputError(f"query file name {path.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8 "
                                 "and cannot be printed; rename the file (e.g. convmv -f latin1 -t utf8)") from None
        if not as_json and any(c in path for c in "\n\r"):
            raise UserInputError(f"query file name {path!r} holds a line break, which the text output (one line per "
                                 "query and per match) cannot print; pass --json (JSON escapes it) or rename the file")
        return path
    return check


def load_index_model(index: Embeddings, checkpoint: str | os.PathLike | None = None, *,
                     device: str = "cpu") -> Embedder:
    """The :class:`~sg_train.embedder.Embedder` that made ``index``: its recorded checkpoint (or
    ``checkpoint``) under its recorded evaluation protocol.

    Raises FileNotFoundError for a missing checkpoint, :class:`~sg_train.errors.UserInputError`
    when the index records none and none is given, or when the checkpoint's model fingerprint
    differs from the index's.
    """
    from sg_train.embedder import load_model  # noqa: PLC0415 - torch only once the index is good
    from sg_train.eval_protocols import EvalProtocol  # noqa: PLC0415

    path = checkpoint if checkpoint is not None else index.record.get("checkpoint")
    if path is None:
        raise UserInputError(f"{index.out_dir} records no checkpoint (embedded from a model object); pass --ckpt CKPT")
    if not os.path.isfile(path):
        hint = "" if checkpoint is not None else f" (recorded in {index.out_dir}/embed.json; pass --ckpt if it moved)"
        raise FileNotFoundError(f"checkpoint not found: {path}{hint}")
    embedder = load_model(path, protocol=EvalProtocol(**index.record["eval_protocol"]), device=device)
    if embedder.fingerprint != index.record["model_fingerprint"]:
        raise UserInputError(
            f"checkpoint {path} is not the model that embedded {index.out_dir} (fingerprint "
            f"{embedder.fingerprint[:12]}, the gallery's {index.record['model_fingerprint'][:12]}, made by "
            f"{index.record.get('checkpoint')}); query descriptors would not be comparable: use that checkpoint, or "
            "embed the gallery again with this one")
    return embedder


def search_gallery(index: Embeddings, embedder: Embedder, queries: list[str], *, top_k: int = 10,
                   use_faiss: bool = False, batch_size: int = 32) -> list[dict[str, Any]]:
    """The ``top_k`` gallery files of each query image, best first.

    Returns ``[{"query": path, "matches": [{"rank": 1.., "file": path, "similarity": float in
    [-1, 1]}, ...]}]`` in query order; ``top_k`` larger than the gallery gives the whole gallery.
    Raises :class:`~sg_train.image_io.ImageReadError` naming a query that cannot be read and
    :class:`~sg_train.errors.UserInputError` for a gallery without descriptors or a bad ``top_k``.
    """
    from sg_train.retrieval import faiss_search, search  # noqa: PLC0415

    if isinstance(top_k, bool) or int(top_k) != top_k or int(top_k) < 1:
        raise UserInputError(f"--top-k must be a positive integer, got {top_k!r}")
    if not index.files:
        raise UserInputError(f"{index.out_dir} holds no descriptors: none of its images could be read "
                             f"({len(index.skipped)} listed in {index.out_dir / 'skipped.tsv'})")
    k = min(int(top_k), len(index.files))
    Q = embedder.embed(queries, batch_size=batch_size)
    if use_faiss:
        idx, scores, _ = faiss_search(Q, index.descriptors, k, index="flat")
    else:
        idx, scores = search(Q, index.descriptors, k)
    return [{"query": query,
             "matches": [{"rank": r + 1, "file": index.files[j], "similarity": float(s)}
                         for r, (j, s) in enumerate(zip(row_idx, row_scores))]}
            for query, row_idx, row_scores in zip(queries, idx.cpu().tolist(), scores.cpu().tolist())]


def format_results(results: list[dict[str, Any]]) -> str:
    """Plain text: per query a ``query: path`` line, then ``rank  similarity  file`` lines."""
    lines: list[str] = []
    for result in results:
        lines.append(f"query: {result['query']}")
        lines.extend(f"  {m['rank']:>3}  {m['similarity']:+.4f}  {m['file']}" for m in result["matches"])
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sg_train.search",
        description="Top-k gallery images of each query image, by cosine similarity of sg-train descriptors.")
    parser.add_argument("queries", metavar="QUERY", nargs="+", help="query image files (or folders of them)")
    parser.add_argument("--index", required=True, metavar="DIR", help="a finished python -m sg_train.embed output")
    parser.add_argument("--ckpt", metavar="CKPT", help="checkpoint (default: the one recorded in DIR/embed.json)")
    parser.add_argument("--top-k", type=int, default=10, metavar="K", help="matches per query (default 10)")
    parser.add_argument("--faiss", action="store_true", help="search with FAISS's exact flat index")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="query images per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.top_k < 1 or args.batch_size < 1:  # before the model is loaded
            raise OptionError(f"--top-k and --batch-size must be >= 1, got {args.top_k} and {args.batch_size}")
        from sg_train.devices import resolve_device  # noqa: PLC0415 - torch once the arguments are read

        device = resolve_device(args.device)
        index = Embeddings.open(args.index)
        queries = collect_images(args.queries, check_name=_query_name_rule(args.json)).files
        if not queries:
            raise UserInputError(f"no query images in {args.queries}")
        embedder = load_index_model(index, args.ckpt, device=device)
        results = search_gallery(index, embedder, queries, top_k=args.top_k, use_faiss=args.faiss,
                                 batch_size=args.batch_size)
    except Exception as exc:
        line = user_error_line(exc)  # re-raises a bug with its traceback
        print(f"sg_train.search: error: {line}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"index": str(index.out_dir), "checkpoint": str(embedder.checkpoint),
                          "backend": "faiss" if args.faiss else "exact", "top_k": args.top_k, "results": results},
                         indent=2, ensure_ascii=False))
    else:
        print(format_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
