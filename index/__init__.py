"""The gradient store (zarr, with its commit protocol) and FAISS search over it.

This package stands alone: nothing in it imports ``influence``. Its errors are in
``index.errors`` and its atomic file writer in ``index.atomic``; the names below load
on first use, so importing either of those does not pull in FAISS and zarr.
"""

from __future__ import annotations

import importlib as _importlib
from typing import Any as _Any

_LAZY = {
    "FeatureStore": "index.store",
    "StoreStatus": "index.store",
    "IndexSpec": "index.search",
    "SearchIndex": "index.search",
    "build_index": "index.search",
    "load_index": "index.search",
    "recall_at_k": "index.search",
    "save_index": "index.search",
}

__all__ = ["FeatureStore", "IndexSpec", "SearchIndex", "StoreStatus", "build_index", "load_index", "recall_at_k", "save_index"]


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'index' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
