"""Name -> factory registries, so a name in a recipe becomes an object without if-chains.

An entry may bring its own config class (a method's keys with its paper's defaults, a preset's
or an optimiser's own keys): ``sslkit.config`` validates a recipe section with the class of the
entry it names.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Optional, TypeVar

from sslkit.errors import UserError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """A named table of factories, e.g. ``METHODS.get("simclr")(cfg)``.

    ``base_config``: the config class every entry's own config derives from (entries registered
    without one use it as it is).
    """

    def __init__(self, kind: str, base_config: Optional[type] = None) -> None:
        self.kind = kind
        self.base_config = base_config
        self._entries: dict[str, T] = {}
        self._configs: dict[str, Any] = {}

    def register(self, name: str, config: Optional[type] = None) -> Callable[[T], T]:
        if config is not None and self.base_config is not None and not issubclass(config, self.base_config):
            raise TypeError(f"{self.kind} '{name}': {config.__name__} must derive from {self.base_config.__name__}")

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = entry
            self._configs[name] = config or self.base_config
            return entry

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UserError(self.unknown(name))
        return self._entries[name]

    def unknown(self, name: str) -> str:
        """The message for a name that is not registered: the nearest one and all of them."""
        return f"unknown {self.kind} '{name}'{did_you_mean(name, self.names())}; known: {', '.join(self.names())}"

    def config(self, name: str) -> Any:
        """The config class of entry ``name``."""
        self.get(name)
        return self._configs[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
