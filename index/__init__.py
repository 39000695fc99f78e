"""The gradient store (zarr, with its commit protocol) and FAISS search over it."""

from index.search import IndexSpec, SearchIndex, build_index, load_index, recall_at_k, save_index
from index.store import FeatureStore, StoreStatus

__all__ = ["FeatureStore", "IndexSpec", "SearchIndex", "StoreStatus", "build_index", "load_index", "recall_at_k", "save_index"]
