"""Checks a config before anything compiles, and derives the values it implies.

Every error is one line that names the field and says how to fix it.
"""

import ast
import difflib
import importlib.util
import math
import pathlib

import jax
import ml_collections

from cljax import components
from cljax.buffer import MEMORY_KINDS, POLICIES
from cljax.data.scenarios import SCENARIOS, class_groups
from cljax.data.sources import BUILTIN_BUILDERS
from cljax.models import MODELS
from cljax.runtime import BACKENDS
from cljax.strategies import STRATEGIES

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A config field that cannot work, with the fix in the message."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(field: str, value, choices) -> None:
    _require(
        value in choices,
        f"{field}={value!r} is not known; set --config.{field} to one of {sorted(choices)}",
    )


def _positive(field: str, value, minimum: int = 1) -> None:
    _require(
        isinstance(value, int | float) and value >= minimum,
        f"{field}={value!r} must be a number >= {minimum}; set --config.{field}",
    )


def _lookup(config: ml_collections.ConfigDict, field: str):
    for part in field.split("."):
        config = config[part]
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks what can be checked without data or devices."""
    _require(
        isinstance(config.dataset.name, str) and config.dataset.name,
        f"dataset.name={config.dataset.name!r} is empty; set --config.dataset.name to a built-in"
        f" dataset {sorted(BUILTIN_BUILDERS)} or a prepared TFDS dataset",
    )
    _one_of("scenario.name", config.scenario.name, SCENARIOS)
    _require(
        config.scenario.name != "joint" or config.scenario.num_tasks == 1,
        f"scenario.num_tasks={config.scenario.num_tasks} must be 1 for scenario.name='joint';"
        " set --config.scenario.num_tasks=1",
    )
    _one_of("strategy.name", config.strategy.name, STRATEGIES)
    _one_of("model.name", config.model.name, MODELS)
    for kind, registry in (("strategy", STRATEGIES), ("model", MODELS)):
        name = config[kind].name
        try:
            components.check(kind, name, registry[name], config[kind].get(name, {}))
        except components.ArgumentError as error:
            raise ConfigError(str(error)) from error
    _one_of("buffer.policy", config.buffer.policy, POLICIES)
    for field in (
        "scenario.num_tasks",
        "batch_size",
        "eval_batch_size",
        "epochs_per_task",
        "num_cpu_devices",
        "dataset.prefetch_depth",
    ):
        _positive(field, _lookup(config, field))
    _positive("learning_rate", config.learning_rate, minimum=0)
    _validate_distributed(config.distributed)
    if STRATEGIES[config.strategy.name].uses_buffer:
        _validate_buffer(config)


def _validate_distributed(distributed: ml_collections.ConfigDict) -> None:
    _one_of("distributed.backend", distributed.backend, BACKENDS)
    _positive("distributed.timeout_s", distributed.timeout_s)
    explicit = [
        distributed.coordinator_address,
        distributed.num_processes,
        distributed.process_id,
    ]
    _require(
        all(value is None for value in explicit) or None not in explicit,
        "distributed.coordinator_address, num_processes and process_id go together; set all"
        " three (--config.distributed.FIELD) or none (automatic detection)",
    )


def _validate_buffer(config: ml_collections.ConfigDict) -> None:
    buffer = config.buffer
    _positive("buffer.num_representatives", buffer.num_representatives)
    _positive("buffer.num_candidates", buffer.num_candidates)
    _positive("buffer.augment_from_task", buffer.augment_from_task, minimum=0)
    _require(
        buffer.num_candidates <= config.batch_size,
        f"buffer.num_candidates={buffer.num_candidates} exceeds batch_size={config.batch_size};"
        " set --config.buffer.num_candidates to at most the per-device batch size",
    )
    if buffer.rehearsal_ratio is not None:
        _require(
            0 < buffer.rehearsal_ratio <= 100,
            f"buffer.rehearsal_ratio={buffer.rehearsal_ratio} must be in (0, 100] (percent of"
            " the training set); set --config.buffer.rehearsal_ratio",
        )
    else:
        _positive("buffer.budget_per_class", buffer.budget_per_class)


def validate_memory_kind(memory_kind: str, available: list[str]) -> None:
    """Checks `buffer.memory_kind` against the memories of the backend's devices."""
    _one_of("buffer.memory_kind", memory_kind, MEMORY_KINDS)
    _require(
        memory_kind in available,
        f"buffer.memory_kind={memory_kind!r} is not supported by the {jax.default_backend()}"
        f" backend (its memories: {sorted(available)}); set --config.buffer.memory_kind=device",
    )


def validate_for_data(
    config: ml_collections.ConfigDict, num_classes: int, train_size: int, num_devices: int
) -> None:
    """Checks what depends on the dataset and the number of data-parallel devices."""
    scenario = config.scenario
    if scenario.name == "class_incremental":
        sizes = class_groups(
            num_classes, scenario.num_tasks, scenario.initial_increment, scenario.increment
        )
        _require(
            sum(sizes) == num_classes and min(sizes) >= 1,
            f"scenario.num_tasks={scenario.num_tasks} with initial_increment="
            f"{scenario.initial_increment} and increment={scenario.increment} gives tasks of"
            f" {sizes} classes, not the {num_classes} classes of {config.dataset.name}; set"
            " --config.scenario.num_tasks (or initial_increment/increment) to cover them exactly",
        )
    if STRATEGIES[config.strategy.name].uses_buffer:
        budget = budget_per_class(config.buffer, train_size, num_classes, num_devices)
        _require(
            budget >= 1,
            f"buffer.rehearsal_ratio={config.buffer.rehearsal_ratio} gives less than one slot"
            f" per class on each of {num_devices} devices; raise --config.buffer.rehearsal_ratio",
        )


def budget_per_class(
    buffer: ml_collections.ConfigDict, train_size: int, num_classes: int, num_devices: int
) -> int:
    """Slots per class per device: `budget_per_class`, or derived from `rehearsal_ratio`.

    As in the paper, N = floor(train_size * ratio / 100 / num_classes / num_devices); a
    set `rehearsal_ratio` takes precedence over `budget_per_class`.
    """
    if buffer.rehearsal_ratio is None:
        return buffer.budget_per_class
    return math.floor(train_size * buffer.rehearsal_ratio / 100 / num_classes / num_devices)


def load_config(spec: str = "default") -> ml_collections.ConfigDict:
    """The config of `spec`: `NAME[:ARG]` for `configs/NAME.py` of this clone (from any
    directory), or `PATH.py[:ARG]` for any config file; ARG goes to its `get_config`."""
    name, _, argument = spec.partition(":")
    path = pathlib.Path(name) if name.endswith(".py") else CONFIG_DIR / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.py"))
        close = difflib.get_close_matches(path.stem, known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(
            f"config={spec!r}: no config file {path}; {hint}give --config=NAME[:ARG] with NAME"
            f" one of {known}, or --config=PATH.py[:ARG]"
        )
    module_spec = importlib.util.spec_from_file_location(f"cljax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
    """Sets each `FIELD=VALUE` (dotted field, value as written on the command line), parsed
    as the field's type; an unknown field or a value of the wrong type is a `ConfigError`."""
    for field, text in overrides.items():
        *parents, leaf = field.split(".")
        node = config
        for depth, part in enumerate(parents):
            child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(child, ml_collections.ConfigDict):
                _unknown_field(config, ".".join(parents[: depth + 1]))
            node = child
        if leaf not in node:
            _unknown_field(config, field)
        if isinstance(node[leaf], ml_collections.ConfigDict):
            example = next(iter(flat_fields(node[leaf], f"{field}.")))
            raise ConfigError(
                f"--config.{field} is a group of fields; set one of them, e.g."
                f" --config.{example}=VALUE"
            )
        try:
            node[leaf] = _parse_value(text, node.get_type(leaf))
        except (TypeError, ValueError, SyntaxError) as error:
            type_name = getattr(node.get_type(leaf), "__name__", node.get_type(leaf))
            raise ConfigError(
                f"{field}={text!r} is not a valid {type_name} ({error}); set --config.{field}"
                f" to a value of type {type_name}"
            ) from None


def _parse_value(text: str, field_type: type):
    """`text` as a value of `field_type` (tuples and lists as Python literals)."""
    if field_type is bool:
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValueError("expected true or false")
        return lowered in ("true", "1")
    if field_type in (tuple, list):
        value = ast.literal_eval(text)
        value = value if isinstance(value, tuple | list) else (value,)
        return field_type(value)
    if field_type is str:
        return text
    if text.lower() == "none":
        return None
    return field_type(text)


def flat_fields(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
    """Every leaf field of `config` by its dotted name."""
    fields = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            fields.update(flat_fields(value, f"{name}."))
        else:
            fields[name] = value
    return fields


def _unknown_field(config: ml_collections.ConfigDict, field: str):
    known = list(flat_fields(config))
    close = difflib.get_close_matches(field, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "see --helpconfig for every field"
    raise ConfigError(f"--config.{field} is not a config field; {hint}")
