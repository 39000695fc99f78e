"""What a build was made with, as frozen values: saved in the store, compared when a build resumes or a store opens.

``BuildSpec`` holds everything that fixes the stored features (task, parameter selection, projector, batch and
chunk sizes, dtype); a resume or extension with different values would mix incompatible rows, so it is refused
with the saved and the new value side by side. ``TrakSpec`` is a scoring option: changing it recomputes TRAK's
inverse instead. A task is recorded by reference (``task_ref``) and never imported back from a store.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from index.store import FEATURE_DTYPES
from influence.errors import BadSpecError, StoreMismatchError
from influence.features.projectors import ProjectorSpec
from influence.features.task import ClassificationTask, Task

BUILTIN_TASK = "classification"
DTYPES = FEATURE_DTYPES  # one source: what the store can hold


def task_ref(task: Task) -> str:
    """How a store names its task: ``classification`` for the built-in one, else ``module:QualName`` of its class."""
    cls = type(task)
    return BUILTIN_TASK if cls is ClassificationTask else f"{cls.__module__}:{cls.__qualname__}"


def resolve_task(stored: str | None, given: Task | None) -> Task:
    """The task to query a store with: the caller's (checked against the stored reference) or the built-in one.

    Never imports what the store names: a custom task must be passed by the caller.
    """
    stored = stored or BUILTIN_TASK
    if given is not None:
        if task_ref(given) != stored:
            raise StoreMismatchError(
                f"task {task_ref(given)} does not match the store's task {stored}; pass the task the store was built with"
            )
        return given
    if stored == BUILTIN_TASK:
        return ClassificationTask()
    raise BadSpecError(
        f"this store was built with the custom task {stored}; open it with Influence.open(path, task={stored.rpartition(':')[2]}()) "
        f"(an instance of {stored}); stores never import code"
    )


@dataclass(frozen=True)
class TrakSpec:
    """TRAK's damping, relative to the spectrum: λ = lambda_rel · trace(ΦᵀΦ)/min(N, k), the mean nonzero eigenvalue
    of ΦᵀΦ (``influence.scoring.trak_lambda``)."""

    lambda_rel: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.lambda_rel) or self.lambda_rel < 0:
            raise BadSpecError(f"--trak-lambda must be a finite number >= 0, got {self.lambda_rel}")


# Store attribute → (BuildSpec field, the build option that sets it), in the order differences are reported.
_FLAGS = {"task": "task=", "params": "--params", "projector": "--projector/--proj-dim/--seed",
          "batch_size": "--batch-size", "rows_per_chunk": "--chunk-rows", "dtype": "--dtype"}


@dataclass(frozen=True)
class BuildSpec:
    """Everything that fixes a store's features; saved as store attributes of the same names."""

    task: str
    params: str
    projector: ProjectorSpec
    batch_size: int
    rows_per_chunk: int
    dtype: str

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise BadSpecError(f"--batch-size must be positive, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise BadSpecError(f"--dtype must be float16 or float32, got {self.dtype}")

    def to_attrs(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["projector"] = self.projector.to_json()
        return doc

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "BuildSpec":
        """The spec a store was built with."""
        return cls(
            task=attrs.get("task", BUILTIN_TASK), params=attrs["params"], projector=ProjectorSpec(**attrs["projector"]),
            batch_size=int(attrs["batch_size"]), rows_per_chunk=int(attrs["rows_per_chunk"]),
            dtype=attrs.get("dtype", "float16"),
        )

    def check_same(self, saved: "BuildSpec", where: str) -> None:
        """Refuse to resume or extend a store built with other values, naming both and the way out."""
        old, new = saved.to_attrs(), self.to_attrs()
        diff = [f.name for f in fields(self) if old[f.name] != new[f.name]]
        if diff:
            shown = "; ".join(f"{k}={json.dumps(old[k])} but this run has {k}={json.dumps(new[k])}" for k in diff)
            raise StoreMismatchError(
                f"store {where} was built with {shown}; pass the same {', '.join(_FLAGS[k] for k in diff)} to resume or "
                "extend it, or use a new --out for a different build"
            )
