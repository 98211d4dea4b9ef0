"""FAISS as a search backend: an exact flat inner-product index by default, IVF or HNSW as
approximate options (their recall@k against exact search is measured and reported). A FAISS
GPU index is used when this faiss build has GPU support and a GPU is present."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._checks import RetrievalInputError, ZeroRowTally, check_descriptors, check_finite, check_k, dtype_name
from ._chunks import auto_chunk_rows, iter_row_chunks, to_tensor
from .search import search

__all__ = ["faiss_search", "faiss_gpu_available", "INDEX_TYPES"]

INDEX_TYPES = ("flat", "ivf", "hnsw")


def _faiss():
    try:
        import faiss  # noqa: PLC0415 - optional heavy import
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise RetrievalInputError("the faiss backend needs faiss (pip install faiss-cpu)") from exc
    return faiss


def faiss_gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _build_index(faiss, X, index: str, *, nlist: int | None, hnsw_m: int):
    dim, n = int(X.shape[1]), int(X.shape[0])
    ip = faiss.METRIC_INNER_PRODUCT
    if index == "flat":
        if dtype_name(X) == "float16":
            # fp16 storage is lossless for fp16 data: still exact, half the memory of IndexFlatIP.
            return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, ip)
        return faiss.IndexFlatIP(dim)
    if index == "hnsw":
        return faiss.IndexHNSWFlat(dim, hnsw_m, ip)
    if index == "ivf":
        nlist = nlist or max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))
        if nlist > n:
            raise RetrievalInputError(f"nlist={nlist} is larger than the database ({n} items)")
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, ip)
        n_train = min(n, max(39 * nlist, 10_000))
        train_rows = np.linspace(0, n - 1, n_train).astype(np.int64)
        sample = X[torch.from_numpy(train_rows)] if isinstance(X, torch.Tensor) else X[train_rows]
        ivf.train(np.ascontiguousarray(to_tensor(sample).float().cpu().numpy()))
        return ivf
    raise RetrievalInputError(f"unknown faiss index {index!r}; choose one of {', '.join(INDEX_TYPES)}")


def faiss_search(Q, X, k: int, *, index: str = "flat", nlist: int | None = None, nprobe: int = 16,
                 hnsw_m: int = 32, ef_search: int = 128, use_gpu: bool | None = None,
                 report_recall: bool = True, chunk_size: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Top-``k`` inner-product search with FAISS.

    ``index``: ``"flat"`` (exact; fp16 databases kept in fp16), ``"ivf"`` (IndexIVFFlat with
    ``nlist`` lists, ``nprobe`` probed) or ``"hnsw"`` (IndexHNSWFlat, ``hnsw_m`` links,
    ``ef_search``). The database is added ``chunk_size`` rows at a time (a tensor, array or
    memmap). ``use_gpu=None`` uses a GPU index when faiss has GPU support and a GPU is present.

    Returns ``(idx, scores, info)`` as CPU tensors (nq, k) and ``info = {"backend": "faiss",
    "index": ..., "gpu": bool, "exact": bool, "recall@k": float (approximate indices, against
    exact torch search, when report_recall)}``.
    """
    faiss = _faiss()
    check_descriptors(Q, X)
    n, dim = int(X.shape[0]), int(X.shape[1])
    k = check_k(k, n)
    if index not in INDEX_TYPES:
        raise RetrievalInputError(f"unknown faiss index {index!r}; choose one of {', '.join(INDEX_TYPES)}")
    rows_per_chunk = chunk_size or auto_chunk_rows(dim)
    cpu_index = _build_index(faiss, X, index, nlist=nlist, hnsw_m=hnsw_m)
    gpu = (faiss_gpu_available() if use_gpu is None else bool(use_gpu)) and index != "hnsw"
    if gpu:
        if not faiss_gpu_available():
            raise RetrievalInputError("use_gpu=True but this faiss build has no GPU support or sees no GPU")
        resources = faiss.StandardGpuResources()
        faiss_index = faiss.index_cpu_to_gpu(resources, 0, cpu_index)
    else:
        faiss_index = cpu_index
    zeros = ZeroRowTally("X (database descriptors)")
    for start, rows in iter_row_chunks(X, rows_per_chunk, device=torch.device("cpu"), dtype=torch.float32):
        check_finite(rows, "X (database descriptors)", row_offset=start)
        zeros.add(rows, start)
        faiss_index.add(np.ascontiguousarray(rows.numpy()))
    zeros.check()
    if index == "ivf":
        faiss_index.nprobe = nprobe
    elif index == "hnsw":
        faiss_index.hnsw.efSearch = max(ef_search, k)
    queries = np.ascontiguousarray(to_tensor(Q).float().cpu().numpy())
    scores, ids = faiss_index.search(queries, k)
    if (ids < 0).any():
        raise RetrievalInputError(
            f"faiss {index} index returned fewer than k={k} results for some queries; "
            "raise nprobe (ivf) or ef_search (hnsw)")
    idx_t, s_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(scores)
    info: dict[str, Any] = {"backend": "faiss", "index": index, "gpu": gpu, "exact": index == "flat"}
    if index != "flat" and report_recall:
        exact_idx, _ = search(Q, X, k, chunk_size=chunk_size)
        hits = sum(len(set(a) & set(b)) for a, b in zip(idx_t.tolist(), exact_idx.cpu().tolist()))
        info["recall@k"] = hits / (idx_t.shape[0] * k)
        info["k"] = k
    return idx_t, s_t, info
