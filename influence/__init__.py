"""influence: which training images, and which regions of them, made my vision model predict this?

Data flow: features (per-example gradients, projected) → index.store (zarr) →
index.search (FAISS) → scoring (TracIn, Grad-Cos, TRAK) → query → attribution / tfa → report → cli.

The pipeline names are loaded on first use, so ``import influence`` (and catching
its errors) stays cheap. The errors are the classes ``index`` raises (see
``influence.errors``): ``except influence.InfluenceError`` catches store errors too.
"""

from __future__ import annotations

import importlib as _importlib
from typing import Any as _Any

from influence.errors import (
    BadCheckpointError, BadDataError, BadSpecError, InfluenceError, NonFiniteError, StoreIncompleteError,
    StoreLockedError, StoreMismatchError,
)

__version__ = "0.1.0"

_LAZY = {
    "build": "influence.pipeline",
    "add": "influence.append",
    "ClassificationTask": "influence.features",
    "ProjectorSpec": "influence.features",
    "Task": "influence.features",
    "Influence": "influence.query",
    "Influencer": "influence.query",
    "QueryResult": "influence.query",
    "describe_store": "influence.query",
    "Recipe": "influence.recipe",
    "exact_scores": "influence.exact",
}

__all__ = [
    "BadCheckpointError", "BadDataError", "BadSpecError", "ClassificationTask", "Influence", "InfluenceError",
    "Influencer", "NonFiniteError", "ProjectorSpec", "QueryResult", "StoreIncompleteError", "StoreLockedError",
    "StoreMismatchError", "Task", "add", "build", "describe_store", "Recipe", "exact_scores",
]


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'influence' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
