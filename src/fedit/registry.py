"""Name -> object registries that fail loudly on unknown names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from fedit.errors import FeditError

T = TypeVar("T")


class UnknownNameError(FeditError, LookupError):
    """A name that no registry entry answers to; the message lists the known ones."""


class Registry(Generic[T]):
    """Partitioners, strategies, templates and selectors are found by name through one of these.

    Researchers add their own with `@REGISTRY.register("name")` without editing fedit.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and not replace:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
