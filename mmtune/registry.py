"""A small name -> object registry that refuses duplicates (timm's `register_model` idea).

Behaviour is looked up by an explicit name, never guessed from substrings of a model name.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from mmtune.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; registering a name twice is an error.

    Args:
        kind: what the registry holds, used in error messages ("model family", "adapter method").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers `obj` under `name`."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """Returns the object for `name`; an unknown name gets an error with close matches."""
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._items), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}.{hint}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
