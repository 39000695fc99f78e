"""One registry helper: methods register their CLI name where they are defined.

Every family of pluggable methods (scoring, pixel attribution, TFA, samplers) keeps a
``Registry``; CLI ``choices`` and ``--help`` text come from it, and registering a name
twice is an error instead of a silent override.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from influence.errors import BadSpecError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → class for one family of methods (``what`` names the family in errors)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"{self.what} {name!r} is registered twice ({self._items[name]!r} and {item!r})")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        """The item registered under ``name``; an unknown name is a ``BadSpecError`` listing the choices."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise BadSpecError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """Registered names, in registration order (CLI choices)."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
