"""A small registry: one per swappable choice (backbones here; CAM methods, seed rules... in stages).

Each registry maps a name to a factory and can list its names, like timm's ``register_model`` /
``create_model`` / ``list_models`` trio.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, name: str | None = None) -> Callable[[F], F]:
        def add(fn: F) -> F:
            key = name or fn.__name__
            if key in self._entries:
                raise KeyError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = fn
            return fn
        return add

    def get(self, name: str, key: str | None = None) -> F:
        """The factory called ``name``; ``key`` names the config knob in the error if there is none."""
        try:
            return self._entries[name]
        except KeyError:
            where = f"{key} = {name!r}: " if key else ""
            raise KeyError(f"{where}unknown {self.kind} {name!r}; available: "
                           f"{', '.join(sorted(self._entries))}") from None

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries


class LazyRegistry(Registry[str]):
    """A registry whose entries live in other modules, named ``"package.module:attribute"`` and imported on first
    use. A step lists its methods this way so that importing the step never imports every method: a stage's cache
    key covers the modules it imports (pipeline.hashing), and :meth:`module_of` tells the stage which method
    module to add for the configured choice. Adding a method is one module plus one line in the table."""

    def __init__(self, kind: str, entries: dict[str, str]):
        super().__init__(kind)
        self._entries.update(entries)

    def module_of(self, name: str, key: str | None = None) -> str:
        """The module that defines ``name`` (not imported); ``key`` names the config knob in the error."""
        return super().get(name, key).partition(":")[0]

    def get(self, name: str, key: str | None = None):
        """The registered object, importing its module."""
        module = importlib.import_module(self.module_of(name, key))
        attribute = self._entries[name].partition(":")[2]
        return getattr(module, attribute) if attribute else module
