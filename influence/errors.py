"""One exception hierarchy for every bad input the toolkit refuses.

The CLI maps any ``InfluenceError`` to exit code 2 with its one-line message;
anything else is an internal error (exit 1). Messages say what was wrong, the
value seen and how to fix it.

The root and the errors the store and search raise are defined in ``index.errors``
(``index`` stands alone and imports nothing from here) and re-exported below as the
same classes, so ``except InfluenceError`` catches them all; this module adds the
errors of the load boundary. Import every error from here.
"""

from __future__ import annotations

from index.errors import (
    BadDataError, BadSpecError, IndexFileError, InfluenceError, NonFiniteError, StoreDamagedError, StoreIncompleteError,
    StoreLockedError, StoreMismatchError,
)


class BadCheckpointError(InfluenceError):
    """A checkpoint that is missing, corrupt, or of another architecture."""


__all__ = [
    "BadCheckpointError", "BadDataError", "BadSpecError", "IndexFileError", "InfluenceError", "NonFiniteError",
    "StoreDamagedError", "StoreIncompleteError", "StoreLockedError", "StoreMismatchError",
]
