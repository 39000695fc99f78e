"""influence: which training images, and which regions of them, made my vision model predict this?

Data flow: features (per-example gradients, projected) → index.store (zarr) →
index.search (FAISS) → scoring (TracIn, Grad-Cos, TRAK) → query → attribution / tfa → report → cli.
"""

from influence.build import build
from influence.errors import (
    BadCheckpointError, BadDataError, BadSpecError, InfluenceError, NonFiniteError, StoreIncompleteError,
    StoreLockedError, StoreMismatchError,
)
from influence.features import ClassificationTask, ProjectorSpec, Task
from influence.query import Influence, Influencer, QueryResult, describe_store

__version__ = "0.1.0"

__all__ = [
    "BadCheckpointError", "BadDataError", "BadSpecError", "ClassificationTask", "Influence", "InfluenceError",
    "Influencer", "NonFiniteError", "ProjectorSpec", "QueryResult", "StoreIncompleteError", "StoreLockedError",
    "StoreMismatchError", "Task", "build", "describe_store",
]
