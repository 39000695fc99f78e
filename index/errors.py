"""The errors ``index`` raises, rooted in the one class every toolkit error shares.

``index`` is the bottom package and imports nothing from ``influence``, so the root
(``InfluenceError``) and the errors the store and search raise are defined here;
``influence.errors`` re-exports them. One ``except InfluenceError`` therefore catches
store and search errors too, and the CLI maps every one of them to exit code 2.
Messages say what was wrong, the value seen and how to fix it.
"""

from __future__ import annotations


class InfluenceError(Exception):
    """Base class: a user-facing error with a one-line, actionable message."""


class BadSpecError(InfluenceError):
    """A method name, option or path that cannot be used (e.g. a FAISS factory string, ``k``, an output folder)."""


class BadDataError(InfluenceError):
    """Input data of the wrong shape or dtype, unreadable, empty, or non-finite."""


class NonFiniteError(BadDataError):
    """NaN or inf in a loss, gradient, feature or query vector."""


class StoreIncompleteError(InfluenceError):
    """A store whose build has not finished (or whose files fail their checks: see the subclasses)."""


class StoreDamagedError(StoreIncompleteError):
    """A store whose metadata or files fail their checks: rebuild it."""


class IndexFileError(StoreDamagedError):
    """A FAISS index file that is missing, unreadable, or does not match its recorded size, checksum or spec."""


class StoreLockedError(InfluenceError):
    """Another process holds the store's writer lock."""


class StoreMismatchError(InfluenceError):
    """A store asked to mix features from a different model, projector or task."""


__all__ = [
    "BadDataError", "BadSpecError", "IndexFileError", "InfluenceError", "NonFiniteError", "StoreDamagedError",
    "StoreIncompleteError", "StoreLockedError", "StoreMismatchError",
]
