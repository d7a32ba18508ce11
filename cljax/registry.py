"""Components chosen by name in a config: one registry per kind, one way to add to it.

Models, strategies, datasets and scenarios each have a `Registry`; its `register(name)` is a
decorator that a module of cljax or the user's own code applies alike:

    from cljax import strategies

    @strategies.register("distill")
    class Distill(strategies.Strategy): ...

Register before the config is loaded: the default config gives every registered model and
strategy its section of arguments (`strategy.distill.*`). A name that is not registered is
one `ConfigError` line listing those that are.
"""

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from cljax.errors import ConfigError

Component = TypeVar("Component")


class Registry(Generic[Component]):
    """The components of one kind (`field` is the config field that names one)."""

    def __init__(self, kind: str, field: str):
        self.kind = kind
        self.field = field
        self._entries: dict[str, Component] = {}

    def register(self, name: str) -> Callable[[Component], Component]:
        """A decorator that registers its target under `name` and returns it unchanged; a
        name registered twice is a `ValueError` (a component replaced by accident)."""

        def add(component: Component) -> Component:
            if name in self._entries and self._entries[name] is not component:
                raise ValueError(f"a {self.kind} named {name!r} is registered already")
            self._entries[name] = component
            return component

        return add

    def __getitem__(self, name: str) -> Component:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(self.unknown(name)) from None

    def unknown(self, name: str) -> str:
        """The one line for a name that is not registered."""
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (
            f"{self.field}={name!r} is not a registered {self.kind}{hint}; set"
            f" --config.{self.field} to one of {self.names()}"
        )

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, Component]]:
        return sorted(self._entries.items())
