"""Retrieval core: exact/FAISS search, SuperGlobal reranking, αQE/αDBA, Revisited Oxford/Paris
mAP (full ranking or exact from a top-k), labelled-set metrics (precision@1, recall@k, mAP@k,
MAP@R), safe ground-truth loading, one-call evaluation, and grids of reranking/αQE/αDBA settings
evaluated on one set of descriptors (``sweep``).

Pure functions on torch tensors (any device) or numpy arrays / memory maps; see docs/design.md §4, §5.
"""
from ._checks import RetrievalInputError
from .evaluation import (
                         BACKENDS,
                         RankedDescriptors,
                         evaluate_descriptors,
                         evaluate_labelled,
                         format_results_table,
                         rank_descriptors,
)
from .faiss_search import INDEX_TYPES, faiss_gpu_available, faiss_search
from .ground_truth import (
                           PROTOCOLS,
                           GndEntries,
                           GroundTruthError,
                           UnsafePickleError,
                           dataset_name,
                           load_gnd,
                           query_gnd,
                           validate_gnd,
)
from .labelled_metrics import labelled_metric_names, labelled_retrieval_metrics, required_rank_columns
from .query_expansion import alpha_dba, alpha_qe
from .rerank import check_rerank_params, superglobal_rerank
from .revisited_map import revisited_map, revisited_map_topk
from .search import search
from .sweep import (
                    SWEEP_PARAMS,
                    SweepPoint,
                    best_point,
                    check_sweep_point,
                    evaluate_sweep,
                    format_sweep_table,
                    sweep_points,
                    sweep_score,
)
from .tail import TailPositions, search_with_tail, tail_positions

__all__ = [
    "BACKENDS", "INDEX_TYPES", "PROTOCOLS", "SWEEP_PARAMS",
    "GndEntries", "GroundTruthError", "RankedDescriptors", "RetrievalInputError", "SweepPoint", "TailPositions",
    "UnsafePickleError",
    "alpha_dba", "alpha_qe", "best_point", "check_rerank_params", "check_sweep_point", "dataset_name",
    "evaluate_descriptors", "evaluate_labelled", "evaluate_sweep", "format_sweep_table", "rank_descriptors",
    "sweep_points", "sweep_score",
    "faiss_gpu_available", "labelled_metric_names", "labelled_retrieval_metrics", "required_rank_columns",
    "faiss_search",
    "format_results_table", "load_gnd", "query_gnd", "revisited_map", "revisited_map_topk", "search",
    "search_with_tail", "superglobal_rerank", "tail_positions", "validate_gnd",
]
