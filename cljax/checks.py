"""Checks of a config that need neither data nor devices, run once before anything else.

Every error is a `ConfigError` whose message is one line naming the field and the fix. The
checks that need the dataset or the devices come with the run's plan (`cljax.run.plan`).
"""

import importlib.util
import math
import os

import jax
import ml_collections

from cljax import augment, components, optim
from cljax.buffer import DRAWS, MEMORY_KINDS, PARTITIONS, POLICIES, STREAM_POLICIES
from cljax.data.pipeline import BAD_IMAGES, WORKER_KINDS
from cljax.data.scenarios import SCENARIOS
from cljax.data.sources import DATASETS
from cljax.errors import ConfigError
from cljax.models import BATCH_NORM, MODELS
from cljax.runtime import BACKENDS
from cljax.strategies import STRATEGIES

DTYPES = ("float32", "bfloat16")
WANDB_MODES = ("online", "offline")
MAX_CPU_DEVICES = 512


def require(condition: bool, message: str) -> None:
    """A `ConfigError` with `message` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def one_of(field: str, value, choices) -> None:
    require(
        value in choices,
        f"{field}={value!r} is not known; set --config.{field} to one of {sorted(choices)}",
    )


def positive(field: str, value, minimum: int = 1) -> None:
    require(
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= minimum,
        f"{field}={value!r} must be a finite number >= {minimum}; set --config.{field}",
    )


def optional_positive(field: str, value, minimum: int = 1) -> None:
    if value is not None:
        positive(field, value, minimum)


def _lookup(config: ml_collections.ConfigDict, field: str):
    for part in field.split("."):
        config = config[part]
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks what can be checked without data or devices."""
    require(
        isinstance(config.dataset.name, str) and config.dataset.name,
        f"dataset.name={config.dataset.name!r} is empty; set --config.dataset.name to a"
        f" registered dataset {DATASETS.names()} or a prepared TFDS dataset",
    )
    one_of("scenario.name", config.scenario.name, SCENARIOS)
    require(
        config.scenario.name != "joint" or config.scenario.num_tasks == 1,
        f"scenario.num_tasks={config.scenario.num_tasks} must be 1 for scenario.name='joint';"
        " set --config.scenario.num_tasks=1",
    )
    one_of("strategy.name", config.strategy.name, STRATEGIES)
    one_of("model.name", config.model.name, MODELS)
    one_of("model.batch_norm", config.model.batch_norm, BATCH_NORM)
    for kind, registry in (("strategy", STRATEGIES), ("model", MODELS)):
        name = config[kind].name
        components.check(kind, name, registry[name], config[kind].get(name, {}))
    one_of("buffer.policy", config.buffer.policy, POLICIES)
    for field in (
        "scenario.num_tasks",
        "batch_size",
        "eval_batch_size",
        "epochs_per_task",
        "num_cpu_devices",
        "dataset.prefetch_depth",
    ):
        positive(field, _lookup(config, field))
    require(
        config.num_cpu_devices <= MAX_CPU_DEVICES,
        f"num_cpu_devices={config.num_cpu_devices} is more than the {MAX_CPU_DEVICES} simulated"
        " devices a CPU run can usefully have; set --config.num_cpu_devices lower",
    )
    one_of("dtype", config.dtype, DTYPES)
    require(
        isinstance(config.label_smoothing, int | float) and 0 <= config.label_smoothing < 1,
        f"label_smoothing={config.label_smoothing!r} must be in [0, 1); set"
        " --config.label_smoothing",
    )
    one_of("dataset.augment", config.dataset.augment, augment.MODES)
    one_of("dataset.bad_images", config.dataset.bad_images, BAD_IMAGES)
    one_of("dataset.workers", config.dataset.workers, WORKER_KINDS)
    optional_positive("dataset.worker_count", config.dataset.worker_count, 0)
    optional_positive("steps_per_dispatch", config.steps_per_dispatch)
    _validate_optimizer(config.optimizer)
    positive("seed", config.seed, minimum=0)
    optional_positive("scenario.class_order_seed", config.scenario.class_order_seed, 0)
    optional_positive("scenario.initial_increment", config.scenario.initial_increment)
    optional_positive("scenario.increment", config.scenario.increment)
    optional_positive("dataset.image_size", config.dataset.image_size)
    _validate_distributed(config.distributed)
    positive("checkpoint.every_steps", config.checkpoint.every_steps, 0)
    positive("checkpoint.keep", config.checkpoint.keep)
    positive("logging.every_steps", config.logging.every_steps)
    one_of("logging.wandb_mode", config.logging.wandb_mode, WANDB_MODES)
    optional_positive("logging.profile_from_step", config.logging.profile_from_step)
    positive("logging.profile_steps", config.logging.profile_steps)
    require(
        config.logging.wandb_project is None or importlib.util.find_spec("wandb") is not None,
        f"logging.wandb_project={config.logging.wandb_project} needs wandb, which is not"
        " installed; pip install wandb, or leave --config.logging.wandb_project unset",
    )
    require(
        config.init_from is None or os.path.isdir(config.init_from),
        f"init_from={config.init_from} is not a directory; give a finished run's workdir or"
        " its final_model/",
    )
    strategy = STRATEGIES[config.strategy.name]
    if strategy.uses_buffer:
        _validate_buffer(config)
    require(
        strategy.buffer_policy in (None, config.buffer.policy),
        f"strategy.name={config.strategy.name!r} needs buffer.policy={strategy.buffer_policy!r};"
        f" set --config.buffer.policy={strategy.buffer_policy}",
    )


def _validate_optimizer(optimizer: ml_collections.ConfigDict) -> None:
    one_of("optimizer.name", optimizer.name, optim.OPTIMIZERS)
    positive("optimizer.learning_rate", optimizer.learning_rate, minimum=0)
    require(
        isinstance(optimizer.momentum, int | float) and 0 <= optimizer.momentum < 1,
        f"optimizer.momentum={optimizer.momentum!r} must be in [0, 1); set"
        " --config.optimizer.momentum",
    )
    positive("optimizer.weight_decay", optimizer.weight_decay, minimum=0)
    one_of("optimizer.lr_scaling", optimizer.lr_scaling, optim.SCALING_RULES)
    positive("optimizer.warmup_epochs", optimizer.warmup_epochs, minimum=0)
    one_of("optimizer.schedule", optimizer.schedule, optim.SCHEDULES)
    one_of("optimizer.schedule_scope", optimizer.schedule_scope, optim.SCOPES)
    epochs, factors = tuple(optimizer.decay_epochs), tuple(optimizer.decay_factors)
    require(
        len(epochs) == len(factors)
        and list(epochs) == sorted(epochs)
        and all(isinstance(v, int | float) and v >= 0 for v in (*epochs, *factors)),
        f"optimizer.decay_epochs={epochs} and decay_factors={factors} must be sequences of"
        " the same length, the epochs increasing, all >= 0; set"
        " --config.optimizer.decay_epochs and --config.optimizer.decay_factors",
    )
    require(
        optimizer.schedule != "step" or len(epochs) > 0,
        "optimizer.schedule='step' needs optimizer.decay_epochs and decay_factors; set them,"
        " e.g. --config.optimizer.decay_epochs='(21,26,28)'"
        " --config.optimizer.decay_factors='(0.5,0.05,0.01)'",
    )


def _validate_distributed(distributed: ml_collections.ConfigDict) -> None:
    one_of("distributed.backend", distributed.backend, BACKENDS)
    positive("distributed.timeout_s", distributed.timeout_s)
    explicit = [
        distributed.coordinator_address,
        distributed.num_processes,
        distributed.process_id,
    ]
    require(
        all(value is None for value in explicit) or None not in explicit,
        "distributed.coordinator_address, num_processes and process_id go together; set all"
        " three (--config.distributed.FIELD) or none (automatic detection)",
    )
    if distributed.coordinator_address is not None:
        host, _, port = distributed.coordinator_address.rpartition(":")
        require(
            bool(host) and port.isdigit() and 0 < int(port) < 65536,
            f"distributed.coordinator_address={distributed.coordinator_address!r} is not"
            " HOST:PORT; set --config.distributed.coordinator_address, e.g. 10.0.0.1:12355",
        )
        positive("distributed.num_processes", distributed.num_processes)
        require(
            0 <= distributed.process_id < distributed.num_processes,
            f"distributed.process_id={distributed.process_id} is not in [0,"
            f" num_processes={distributed.num_processes}); set --config.distributed.process_id",
        )


def _validate_buffer(config: ml_collections.ConfigDict) -> None:
    buffer = config.buffer
    positive("buffer.num_representatives", buffer.num_representatives)
    positive("buffer.num_candidates", buffer.num_candidates)
    positive("buffer.augment_from_task", buffer.augment_from_task, minimum=0)
    require(
        buffer.augment_from_task < config.scenario.num_tasks,
        f"buffer.augment_from_task={buffer.augment_from_task} is past the last task (tasks"
        f" 0..{config.scenario.num_tasks - 1}): no batch would ever get representatives; set"
        " --config.buffer.augment_from_task below scenario.num_tasks",
    )
    require(
        buffer.num_candidates <= config.batch_size,
        f"buffer.num_candidates={buffer.num_candidates} exceeds batch_size={config.batch_size};"
        " set --config.buffer.num_candidates to at most the per-device batch size",
    )
    one_of("buffer.partition", buffer.partition, PARTITIONS)
    one_of("buffer.draw", buffer.draw, DRAWS)
    require(
        buffer.policy not in STREAM_POLICIES
        or (buffer.partition, buffer.memory_kind) == ("stream", "device"),
        f"buffer.policy={buffer.policy!r} fills one partition held on the devices; set"
        " --config.buffer.partition=stream and --config.buffer.memory_kind=device",
    )
    optional_positive("buffer.size", buffer.size)
    if buffer.rehearsal_ratio is not None:
        require(
            0 < buffer.rehearsal_ratio <= 100,
            f"buffer.rehearsal_ratio={buffer.rehearsal_ratio} must be in (0, 100] (percent of"
            " the training set); set --config.buffer.rehearsal_ratio",
        )
    elif buffer.size is None:
        require(
            buffer.partition == "class",
            "buffer.partition='stream' needs the buffer's size; set --config.buffer.size (slots"
            " of the whole buffer) or --config.buffer.rehearsal_ratio",
        )
        positive("buffer.budget_per_class", buffer.budget_per_class)


def validate_memory_kind(memory_kind: str, available: list[str]) -> None:
    """Checks `buffer.memory_kind` against the memories of the backend's devices."""
    one_of("buffer.memory_kind", memory_kind, MEMORY_KINDS)
    require(
        memory_kind in available,
        f"buffer.memory_kind={memory_kind!r} is not supported by the {jax.default_backend()}"
        f" backend (its memories: {sorted(available)}); set --config.buffer.memory_kind=device",
    )
