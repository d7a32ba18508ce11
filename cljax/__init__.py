"""cljax: data-parallel continual learning with distributed rehearsal buffers, in JAX.

The names a notebook or a train step of one's own needs:

    import cljax

    config = cljax.load_config("default:er")          # a config that ships with cljax
    metrics = cljax.train_and_evaluate(config, "runs/er")

    buffer = cljax.rehearsal_buffer(num_classes=10, budget_per_class=20, num_candidates=8,
                                    num_representatives=8)    # pure functions, optax-style

    @cljax.register_strategy("mine")
    class Mine(cljax.Strategy): ...

Every name but the errors is imported on first use, so `import cljax.buffer` stays light
(JAX and NumPy only) and `import cljax` costs nothing.
"""

import importlib
from typing import TYPE_CHECKING

from cljax.errors import (
    CljaxError,
    ConfigError,
    DataError,
    DatasetError,
    Interrupted,
    Preempted,
    RunFailed,
)

__version__ = "0.1.0"

# Public name -> (module, attribute), imported when first used.
_LAZY = {
    "load_config": ("cljax.configuration", "load_config"),
    "apply_overrides": ("cljax.configuration", "apply_overrides"),
    "train_and_evaluate": ("cljax.trainer", "train_and_evaluate"),
    "rehearsal_buffer": ("cljax.buffer", "rehearsal_buffer"),
    "on_mesh": ("cljax.buffer", "on_mesh"),
    "Strategy": ("cljax.strategies", "Strategy"),
    "argument": ("cljax.components", "argument"),
    "register_strategy": ("cljax.strategies", "register"),
    "register_model": ("cljax.models", "register"),
    "register_dataset": ("cljax.data.sources", "register"),
    "register_scenario": ("cljax.data.scenarios", "register"),
}

__all__ = [
    "CljaxError",
    "ConfigError",
    "DataError",
    "DatasetError",
    "Interrupted",
    "Preempted",
    "RunFailed",
    "Strategy",
    "__version__",
    "apply_overrides",
    "argument",
    "load_config",
    "on_mesh",
    "register_dataset",
    "register_model",
    "register_scenario",
    "register_strategy",
    "rehearsal_buffer",
    "train_and_evaluate",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cljax' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from cljax.buffer import on_mesh, rehearsal_buffer
    from cljax.components import argument
    from cljax.configuration import apply_overrides, load_config
    from cljax.data.scenarios import register as register_scenario
    from cljax.data.sources import register as register_dataset
    from cljax.models import register as register_model
    from cljax.strategies import Strategy
    from cljax.strategies import register as register_strategy
    from cljax.trainer import train_and_evaluate
