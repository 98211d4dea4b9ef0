"""Retrieval core: exact/FAISS search, SuperGlobal reranking, αQE/αDBA, Revisited Oxford/Paris
mAP (full ranking or exact from a top-k), labelled-set metrics (precision@1, recall@k, mAP@k,
MAP@R), safe ground-truth loading, and one-call evaluation.

Pure functions on torch tensors (any device) or numpy arrays / memory maps; see docs/design.md §4, §5.
"""
from ._checks import RetrievalInputError
from .evaluation import BACKENDS, evaluate_descriptors, evaluate_labelled, format_results_table
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
from .labelled_metrics import labelled_retrieval_metrics, required_rank_columns
from .query_expansion import alpha_dba, alpha_qe
from .rerank import check_rerank_params, superglobal_rerank
from .revisited_map import revisited_map, revisited_map_topk
from .search import search
from .tail import TailPositions, search_with_tail, tail_positions

__all__ = [
    "BACKENDS", "INDEX_TYPES", "PROTOCOLS",
    "GndEntries", "GroundTruthError", "RetrievalInputError", "TailPositions", "UnsafePickleError",
    "alpha_dba", "alpha_qe", "check_rerank_params", "dataset_name", "evaluate_descriptors", "evaluate_labelled",
    "faiss_gpu_available", "labelled_retrieval_metrics", "required_rank_columns",
    "faiss_search",
    "format_results_table", "load_gnd", "query_gnd", "revisited_map", "revisited_map_topk", "search",
    "search_with_tail", "superglobal_rerank", "tail_positions", "validate_gnd",
]
