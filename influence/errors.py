"""One exception hierarchy for every bad input the toolkit refuses.

The CLI maps any ``InfluenceError`` to exit code 2 with its one-line message;
anything else is an internal error (exit 1). Messages say what was wrong, the
value seen and how to fix it.
"""

from __future__ import annotations


class InfluenceError(Exception):
    """Base class: a user-facing error with a one-line, actionable message."""


class BadSpecError(InfluenceError):
    """A model or data spec, method name or option that cannot be resolved."""


class BadDataError(InfluenceError):
    """Input data of the wrong shape or dtype, unreadable, empty, or non-finite."""


class BadCheckpointError(InfluenceError):
    """A checkpoint that is missing, corrupt, or of another architecture."""


class StoreMismatchError(InfluenceError):
    """A store asked to mix features from a different model, projector or task."""


class StoreIncompleteError(InfluenceError):
    """A store whose build has not finished (or whose files fail their checks)."""


class StoreLockedError(InfluenceError):
    """Another process holds the store's writer lock."""


class NonFiniteError(BadDataError):
    """NaN or inf in a loss, gradient or feature."""
