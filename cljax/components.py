"""Documented, checked arguments of the components chosen by name (models, strategies).

A component is a dataclass (a Flax module, a strategy) whose config arguments are the fields
declared with `argument`: each has a default, a one-line meaning and optionally a smallest
allowed value. Other fields (a model's number of classes, its dtype) are supplied by cljax.
The config holds one sub-dict per registered component, `<kind>.<name>.<field>`, generated
from these declarations, so a new component needs no config code of its own.
"""

import dataclasses
import math
from collections.abc import Mapping

import ml_collections

from cljax.errors import ArgumentError


def argument(
    default, doc: str, minimum: float | None = None, choices: tuple[str, ...] | None = None
):
    """A config argument of a component: its default, one-line meaning and lower bound (of
    each item, for a sequence), or the values it may take."""
    return dataclasses.field(
        default=default, metadata={"doc": doc, "minimum": minimum, "choices": choices}
    )


def arguments(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` declared with `argument`."""
    return [field for field in dataclasses.fields(cls) if "doc" in field.metadata]


def default_config(registry: Mapping[str, type]) -> ml_collections.ConfigDict:
    """`{name: {argument: default}}` for every component of `registry`."""
    return ml_collections.ConfigDict(
        {name: {f.name: f.default for f in arguments(cls)} for name, cls in registry.items()}
    )


def check(kind: str, name: str, cls: type, values: Mapping) -> None:
    """Raises `ArgumentError` for arguments `cls` does not take or values below their bound."""
    known = {field.name: field for field in arguments(cls)}
    for key, value in values.items():
        field_name = f"{kind}.{name}.{key}"
        if key not in known:
            raise ArgumentError(
                f"{field_name} is not an argument of {kind} {name!r}; its arguments are"
                f" {sorted(known) or 'none'}"
            )
        choices = known[key].metadata["choices"]
        if choices is not None and value not in choices:
            raise ArgumentError(
                f"{field_name}={value!r} is not one of {list(choices)}; set --config.{field_name}"
            )
        minimum = known[key].metadata["minimum"]
        if minimum is not None and not _at_least(value, minimum):
            what = "numbers" if isinstance(value, tuple | list) else "a number"
            raise ArgumentError(
                f"{field_name}={value!r} must be {what} >= {minimum}; set --config.{field_name}"
            )


def _at_least(value, minimum: float) -> bool:
    """`value` (or, for a sequence, each of its items) is a finite number >= `minimum`."""
    items = value if isinstance(value, tuple | list) else (value,)
    return all(
        isinstance(item, int | float)
        and not isinstance(item, bool)
        and math.isfinite(item)
        and item >= minimum
        for item in items
    )


def build(kind: str, name: str, cls: type, values: Mapping, **supplied):
    """`cls(**values, **supplied)` after `check`."""
    check(kind, name, cls, values)
    return cls(**values, **supplied)
