"""The one registry type behind every extension point (models, statistics, scorers, protocols, recoveries,
loggers): entries by name, one duplicate rule, one "unknown name" line, one auto-import of a package's
modules, so that a new entry is one file (plus its config)."""
from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
import warnings
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name. ``what`` names the kind in messages ("scorer"); ``key`` is the config
    key that selects an entry ("scorer.name"), so that a bad name is the one line ``key=name; accepted: ...``.
    ``name_of`` gives a registered object's own name (``register(obj)`` without a name)."""

    def __init__(self, what: str, key: str, name_of: Callable[[T], str] = lambda obj: obj.name):
        self.what, self.key, self._name_of = what, key, name_of
        self._entries: dict[str, T] = {}

    def register(self, obj: T, name: str | None = None) -> T:
        """File ``obj`` under ``name`` (default: its own name); returns it, so it serves as a decorator. A
        name registered twice with another object warns, and the later one wins."""
        name = self._name_of(obj) if name is None else name
        previous = self._entries.get(name)
        if previous is not None and previous is not obj:
            warnings.warn(f"{self.what} {name!r} registered twice; the later definition wins", stacklevel=2)
        self._entries[name] = obj
        return obj

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        return self._entries[name]

    def unknown(self, name: object, also: Iterable[str] = ()) -> str:
        """The line refusing ``name``: the config key, the value, and every accepted name (then ``also``)."""
        return f"{self.key}={name}; accepted: {', '.join([*self.names(), *also])}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._entries.items()))

    def values(self) -> list[T]:
        return [entry for _, entry in self.items()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def build(self, name: str, options: Mapping[str, Any], *, also: Iterable[str] = ()) -> Any:
        """``get(name)(**options)``; an option its constructor does not take is refused as
        ``section.option=value; accepted: section.a, ...`` (the keys it takes, then ``also``), ``section``
        being ``key``'s (``recover`` for ``recover.name``)."""
        factory: Any = self.get(name)
        taken = [p.name for p in inspect.signature(factory).parameters.values()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = sorted(set(options) - set(taken))
        if unknown:
            section = self.key.rpartition(".")[0] or self.key
            keys = ", ".join(f"{section}.{k}" for k in [*taken, *also]) or "none"
            raise ValueError(f"{section}.{unknown[0]}={options[unknown[0]]}; accepted: {keys}")
        return factory(**options)

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Registry[T]]:
        """Entries registered or replaced inside the block are undone after it (for temporary entries)."""
        saved = dict(self._entries)
        try:
            yield self
        finally:
            self._entries = saved


def import_modules(package: str, path: Iterable[str]) -> None:
    """Import every module of ``package`` (its ``__path__``), so that the entries they define register
    themselves: adding an entry is adding a file."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")
