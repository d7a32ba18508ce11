"""Checks a config before anything compiles, and derives the values it implies.

Every error is one line that names the field and says how to fix it.
"""

import ast
import difflib
import importlib.util
import math
import os
import pathlib
import sys

import jax
import ml_collections

from cljax import augment, components, optim
from cljax.buffer import MEMORY_KINDS, PARTITIONS, POLICIES
from cljax.data.pipeline import BAD_IMAGES, WORKER_KINDS
from cljax.data.scenarios import SCENARIOS, class_groups
from cljax.data.sources import BUILTIN_BUILDERS
from cljax.messages import ConfigError
from cljax.models import BATCH_NORM, MODELS
from cljax.runtime import BACKENDS
from cljax.strategies import STRATEGIES

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
DTYPES = ("float32", "bfloat16")
WANDB_MODES = ("online", "offline")
MAX_CPU_DEVICES = 512

# One line per config field; model.<name>.* and strategy.<name>.* come from the components.
FIELD_DOCS = {
    "seed": "seeds parameters, data order and every buffer decision (>= 0)",
    "num_cpu_devices": "simulated CPU devices of the whole run, split evenly over its"
    " processes (ignored on GPU)",
    "batch_size": "b: new samples per device per step",
    "eval_batch_size": "global batch of the evaluation pass",
    "epochs_per_task": "epochs over each task's training data",
    "dtype": f"computation dtype, one of {list(DTYPES)} (parameters, optimizer state and"
    " BatchNorm statistics stay float32; the buffer keeps the stored dtype)",
    "label_smoothing": "weight s of the uniform distribution mixed into the targets of every"
    " cross-entropy (0: none)",
    "optimizer.name": f"one of {list(optim.OPTIMIZERS)}",
    "optimizer.learning_rate": "learning rate of one device (scaled by lr_scaling)",
    "optimizer.momentum": "SGD momentum",
    "optimizer.nesterov": "SGD with Nesterov momentum",
    "optimizer.weight_decay": "L2 weight decay (SGD: coupled, as PyTorch's; Adam: AdamW's)",
    "optimizer.decay_norm_and_bias": "decay BatchNorm scales and biases too (PyTorch's"
    " default; the paper's runs do)",
    "optimizer.lr_scaling": "scale the learning rate with the D data-parallel devices:"
    " none, linear (x D) or paper (x min(D, 64))",
    "optimizer.warmup_epochs": "epochs of linear warm-up from learning_rate to the scaled rate",
    "optimizer.schedule": f"after warm-up, one of {list(optim.SCHEDULES)}",
    "optimizer.decay_epochs": "step schedule: epochs at which the rate becomes a fraction of"
    " the peak",
    "optimizer.decay_factors": "step schedule: those fractions of the peak (not cumulative)",
    "optimizer.schedule_scope": "task: the schedule restarts at every task (the paper's);"
    " stream: it runs once over all tasks",
    "optimizer.reset_each_task": "reset the optimizer state (momentum) at every task (the paper's)",
    "dataset.name": f"built-in {sorted(BUILTIN_BUILDERS)} (no download), imagefolder (at"
    " dataset.path) or any TFDS image-classification dataset prepared as array_record (mnist,"
    " cifar10, imagenet2012, ...)",
    "dataset.data_dir": "TFDS data dir (None: $TFDS_DATA_DIR, else ~/tensorflow_datasets)",
    "dataset.image_size": "resize (shorter side) and crop images to this size; needed for"
    " datasets of varying image size (imagenet2012)",
    "dataset.augment": f"one of {list(augment.MODES)}: crop_flip (pad-4 crop and flip on the"
    " device), inception (random resized crop of new samples on the host, of replayed ones on"
    " the device); auto: none for non-RGB inputs, crop_flip up to 64 pixels, inception above",
    "dataset.mean": "per-channel mean of inputs scaled to [0, 1] (None: the dataset's)",
    "dataset.std": "per-channel standard deviation of inputs scaled to [0, 1] (None: the"
    " dataset's)",
    "dataset.prefetch_depth": "batches the prefetch thread keeps ready for the training loop",
    "dataset.path": "the folder of dataset.name=imagefolder, holding train/<class>/ and"
    " val/<class>/",
    "dataset.worker_count": "input workers per training process (None: none for data held in"
    " memory, else one per core left, at most 16)",
    "dataset.workers": "threads (decoding and resizing release the GIL; measured faster) or"
    " processes (Grain worker processes, batches in shared memory; no GIL shared with the"
    " training loop)",
    "dataset.bad_images": "an image that cannot be decoded: stop (one line naming it) or skip"
    " (its row is left out and counted)",
    "scenario.name": f"one of {list(SCENARIOS)}",
    "scenario.num_tasks": "tasks (1 for joint)",
    "scenario.class_order_seed": "shuffle the class order with this seed (None: classes in order)",
    "scenario.initial_increment": "classes in the first task (None: an equal split)",
    "scenario.increment": "classes in each later task (None: an equal split)",
    "strategy.name": f"one of {sorted(STRATEGIES)}; strategy.<name>.* are its hyperparameters",
    "buffer.budget_per_class": "N: slots per class per device (partition=class)",
    "buffer.rehearsal_ratio": "if set, N = floor(train_size * ratio / 100 / P / num_devices),"
    " P the partitions (classes, or 1), as in the paper (takes precedence over"
    " budget_per_class and size)",
    "buffer.size": "if set, the slots of the whole buffer over all devices: N = floor(size / P"
    " / num_devices) (takes precedence over budget_per_class)",
    "buffer.partition": f"one of {list(PARTITIONS)}: class (each class its own N slots and"
    " reservoir, the paper's) or stream (one reservoir of N slots per device over every sample"
    " of the stream, the DER paper's; needs size or rehearsal_ratio)",
    "buffer.num_candidates": "c: samples of each device's batch offered to its buffer per step",
    "buffer.num_representatives": "r: samples from the global buffer added to each device's"
    " batch per step",
    "buffer.policy": f"one of {list(POLICIES)}",
    "buffer.augment_from_task": "first task whose batches get representatives (the buffer"
    " fills from task 0)",
    "buffer.memory_kind": "where the buffer's slots live: device, or pinned_host (host"
    " memory; only the r drawn records move to the device)",
    "model.name": f"one of {sorted(MODELS)}; model.<name>.* are its arguments",
    "model.batch_norm": "global: BatchNorm statistics over every device's rows (a step on D"
    " devices equals one on the global batch; 2 all-reduces per BatchNorm layer on the"
    " critical path); per_device: over each device's own rows, as PyTorch without"
    " SyncBatchNorm (running statistics averaged over devices with the gradients)",
    "distributed.backend": "jax (jax.distributed) or mpi (mpirun + mpi4jax, one device per"
    " process)",
    "distributed.coordinator_address": "host:port of process 0 for an explicit"
    " jax.distributed set-up (with num_processes and process_id; None: detected)",
    "distributed.num_processes": "processes of an explicit jax.distributed set-up",
    "distributed.process_id": "this process's index in an explicit jax.distributed set-up",
    "distributed.timeout_s": "how long a process waits for the others (start-up, progress)"
    " before stopping with an error",
    "distributed.log_dir": "every process appends its log lines to process_<i>.log there",
    "checkpoint.every_steps": "save a checkpoint every this many training steps of the run"
    " (0: only at the end of every task, which is always done)",
    "checkpoint.keep": "checkpoints kept in <workdir>/checkpoints (the newest ones)",
    "init_from": "start from the parameters and BatchNorm statistics of a finished run"
    " (its workdir or its final_model/; None: fresh ones from seed)",
    "logging.every_steps": "write the training scalars to TensorBoard (and W&B) every this"
    " many steps",
    "logging.wandb_project": "log to this Weights & Biases project too (None: TensorBoard only)",
    "logging.wandb_entity": "the W&B team or user that owns the project (None: your default)",
    "logging.wandb_group": "the W&B group of the run, e.g. the sweep it belongs to",
    "logging.wandb_mode": "online, or offline (files under <workdir>/wandb, for `wandb sync`)",
    "logging.profile_from_step": "trace logging.profile_steps training steps from this step of"
    " the run (>= 1; step 0 compiles) into <workdir>/profile/process_<i> for TensorBoard's"
    " profile plugin, with a summary.json of where the step's time goes (cljax/profiling.py);"
    " None: no trace",
    "logging.profile_steps": "training steps traced from logging.profile_from_step (fewer if"
    " their task ends first)",
}


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
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= minimum,
        f"{field}={value!r} must be a finite number >= {minimum}; set --config.{field}",
    )


def _optional_positive(field: str, value, minimum: int = 1) -> None:
    if value is not None:
        _positive(field, value, minimum)


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
    _one_of("model.batch_norm", config.model.batch_norm, BATCH_NORM)
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
    _require(
        config.num_cpu_devices <= MAX_CPU_DEVICES,
        f"num_cpu_devices={config.num_cpu_devices} is more than the {MAX_CPU_DEVICES} simulated"
        " devices a CPU run can usefully have; set --config.num_cpu_devices lower",
    )
    _one_of("dtype", config.dtype, DTYPES)
    _require(
        isinstance(config.label_smoothing, int | float) and 0 <= config.label_smoothing < 1,
        f"label_smoothing={config.label_smoothing!r} must be in [0, 1); set"
        " --config.label_smoothing",
    )
    _one_of("dataset.augment", config.dataset.augment, augment.MODES)
    _one_of("dataset.bad_images", config.dataset.bad_images, BAD_IMAGES)
    _one_of("dataset.workers", config.dataset.workers, WORKER_KINDS)
    _optional_positive("dataset.worker_count", config.dataset.worker_count, 0)
    _validate_optimizer(config.optimizer)
    _positive("seed", config.seed, minimum=0)
    _optional_positive("scenario.class_order_seed", config.scenario.class_order_seed, 0)
    _optional_positive("scenario.initial_increment", config.scenario.initial_increment)
    _optional_positive("scenario.increment", config.scenario.increment)
    _optional_positive("dataset.image_size", config.dataset.image_size)
    _validate_distributed(config.distributed)
    _positive("checkpoint.every_steps", config.checkpoint.every_steps, 0)
    _positive("checkpoint.keep", config.checkpoint.keep)
    _positive("logging.every_steps", config.logging.every_steps)
    _one_of("logging.wandb_mode", config.logging.wandb_mode, WANDB_MODES)
    _optional_positive("logging.profile_from_step", config.logging.profile_from_step)
    _positive("logging.profile_steps", config.logging.profile_steps)
    _require(
        config.logging.wandb_project is None or importlib.util.find_spec("wandb") is not None,
        f"logging.wandb_project={config.logging.wandb_project} needs wandb, which is not"
        " installed; pip install wandb, or leave --config.logging.wandb_project unset",
    )
    _require(
        config.init_from is None or os.path.isdir(config.init_from),
        f"init_from={config.init_from} is not a directory; give a finished run's workdir or"
        " its final_model/",
    )
    if STRATEGIES[config.strategy.name].uses_buffer:
        _validate_buffer(config)


def _validate_optimizer(optimizer: ml_collections.ConfigDict) -> None:
    _one_of("optimizer.name", optimizer.name, optim.OPTIMIZERS)
    _positive("optimizer.learning_rate", optimizer.learning_rate, minimum=0)
    _require(
        isinstance(optimizer.momentum, int | float) and 0 <= optimizer.momentum < 1,
        f"optimizer.momentum={optimizer.momentum!r} must be in [0, 1); set"
        " --config.optimizer.momentum",
    )
    _positive("optimizer.weight_decay", optimizer.weight_decay, minimum=0)
    _one_of("optimizer.lr_scaling", optimizer.lr_scaling, optim.SCALING_RULES)
    _positive("optimizer.warmup_epochs", optimizer.warmup_epochs, minimum=0)
    _one_of("optimizer.schedule", optimizer.schedule, optim.SCHEDULES)
    _one_of("optimizer.schedule_scope", optimizer.schedule_scope, optim.SCOPES)
    epochs, factors = tuple(optimizer.decay_epochs), tuple(optimizer.decay_factors)
    _require(
        len(epochs) == len(factors)
        and list(epochs) == sorted(epochs)
        and all(isinstance(v, int | float) and v >= 0 for v in (*epochs, *factors)),
        f"optimizer.decay_epochs={epochs} and decay_factors={factors} must be sequences of"
        " the same length, the epochs increasing, all >= 0; set"
        " --config.optimizer.decay_epochs and --config.optimizer.decay_factors",
    )
    _require(
        optimizer.schedule != "step" or len(epochs) > 0,
        "optimizer.schedule='step' needs optimizer.decay_epochs and decay_factors; set them,"
        " e.g. --config.optimizer.decay_epochs='(21,26,28)'"
        " --config.optimizer.decay_factors='(0.5,0.05,0.01)'",
    )


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
    if distributed.coordinator_address is not None:
        host, _, port = distributed.coordinator_address.rpartition(":")
        _require(
            bool(host) and port.isdigit() and 0 < int(port) < 65536,
            f"distributed.coordinator_address={distributed.coordinator_address!r} is not"
            " HOST:PORT; set --config.distributed.coordinator_address, e.g. 10.0.0.1:12355",
        )
        _positive("distributed.num_processes", distributed.num_processes)
        _require(
            0 <= distributed.process_id < distributed.num_processes,
            f"distributed.process_id={distributed.process_id} is not in [0,"
            f" num_processes={distributed.num_processes}); set --config.distributed.process_id",
        )


def _validate_buffer(config: ml_collections.ConfigDict) -> None:
    buffer = config.buffer
    _positive("buffer.num_representatives", buffer.num_representatives)
    _positive("buffer.num_candidates", buffer.num_candidates)
    _positive("buffer.augment_from_task", buffer.augment_from_task, minimum=0)
    _require(
        buffer.augment_from_task < config.scenario.num_tasks,
        f"buffer.augment_from_task={buffer.augment_from_task} is past the last task (tasks"
        f" 0..{config.scenario.num_tasks - 1}): no batch would ever get representatives; set"
        " --config.buffer.augment_from_task below scenario.num_tasks",
    )
    _require(
        buffer.num_candidates <= config.batch_size,
        f"buffer.num_candidates={buffer.num_candidates} exceeds batch_size={config.batch_size};"
        " set --config.buffer.num_candidates to at most the per-device batch size",
    )
    _one_of("buffer.partition", buffer.partition, PARTITIONS)
    _optional_positive("buffer.size", buffer.size)
    if buffer.rehearsal_ratio is not None:
        _require(
            0 < buffer.rehearsal_ratio <= 100,
            f"buffer.rehearsal_ratio={buffer.rehearsal_ratio} must be in (0, 100] (percent of"
            " the training set); set --config.buffer.rehearsal_ratio",
        )
    elif buffer.size is None:
        _require(
            buffer.partition == "class",
            "buffer.partition='stream' needs the buffer's size; set --config.buffer.size (slots"
            " of the whole buffer) or --config.buffer.rehearsal_ratio",
        )
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
    config: ml_collections.ConfigDict,
    num_classes: int,
    train_size: int,
    num_devices: int,
    resizable: bool = False,
    channels: int = 1,
) -> None:
    """Checks what depends on the dataset (`resizable`: its images can be resized;
    `channels` per input) and the number of data-parallel devices."""
    for field in ("dataset.mean", "dataset.std"):
        value = _lookup(config, field)
        _require(
            value is None
            or (
                len(value) == channels
                and all(isinstance(v, int | float) and math.isfinite(v) for v in value)
                and (field == "dataset.mean" or min(value) > 0)
            ),
            f"{field}={value!r} must hold {channels} finite numbers (positive for std), one"
            f" per channel of {config.dataset.name}; set --config.{field} or leave it unset",
        )
    _require(
        config.dataset.image_size is None or resizable,
        f"dataset.image_size={config.dataset.image_size} does not apply to"
        f" {config.dataset.name}, whose inputs have a fixed shape; unset"
        " --config.dataset.image_size",
    )
    scenario = config.scenario
    if scenario.name == "class_incremental":
        sizes = class_groups(
            num_classes, scenario.num_tasks, scenario.initial_increment, scenario.increment
        )
        _require(
            sum(sizes) == num_classes and min(sizes) >= 1,
            f"scenario.num_tasks={scenario.num_tasks} with initial_increment="
            f"{scenario.initial_increment} and increment={scenario.increment} gives tasks of"
            f" {_short(sizes)} classes, not the {num_classes} classes of {config.dataset.name}; set"
            " --config.scenario.num_tasks (or initial_increment/increment) to cover them exactly",
        )
    if STRATEGIES[config.strategy.name].uses_buffer:
        budget = budget_per_class(config.buffer, train_size, num_classes, num_devices)
        partitions = num_partitions(config.buffer, num_classes)
        field = "size" if config.buffer.rehearsal_ratio is None else "rehearsal_ratio"
        _require(
            budget >= 1,
            f"buffer.{field}={config.buffer[field]} gives less than one slot per"
            f" {config.buffer.partition} partition on each of {num_devices} devices; raise"
            f" --config.buffer.{field}",
        )
        total = budget * partitions * num_devices
        _require(
            config.buffer.num_representatives <= total,
            f"buffer.num_representatives={config.buffer.num_representatives} exceeds the"
            f" {total} slots of the whole buffer ({budget} per partition x {partitions}"
            f" partitions x {num_devices} devices): every draw would repeat samples; lower"
            " --config.buffer.num_representatives or enlarge the buffer",
        )


def validate_buffer_memory(
    config: ml_collections.ConfigDict, buffer_bytes: int, available_bytes: int, where: str
) -> None:
    """The buffer of one device (`buffer_bytes`) must fit in the memory it lives in."""
    _require(
        buffer_bytes <= available_bytes,
        f"the buffer needs {buffer_bytes / 2**30:.1f} GiB per device (buffer.budget_per_class="
        f"{config.buffer.budget_per_class}, size={config.buffer.size}, rehearsal_ratio="
        f"{config.buffer.rehearsal_ratio}), more than the {available_bytes / 2**30:.1f} GiB of"
        f" {where}; lower --config.buffer.budget_per_class, size or rehearsal_ratio",
    )


def validate_scenario(
    config: ml_collections.ConfigDict, scenario, train_size: int, test_size: int
) -> None:
    """Every task must have training and test samples (else its accuracy is undefined)."""
    for task in range(scenario.num_tasks):
        for split, rows, size in (
            ("training", scenario.train_rows[task], train_size),
            ("test", scenario.test_rows[task], test_size),
        ):
            _require(
                len(rows) > 0,
                f"scenario.num_tasks={config.scenario.num_tasks} leaves task {task} without"
                f" {split} samples ({config.dataset.name} has {size}); lower"
                " --config.scenario.num_tasks",
            )


def budget_per_class(
    buffer: ml_collections.ConfigDict, train_size: int, num_classes: int, num_devices: int
) -> int:
    """N, the slots per partition per device: from `rehearsal_ratio` if set, as in the
    paper (N = floor(train_size * ratio / 100 / P / num_devices)), else from `size` if set,
    else `budget_per_class`. P is the number of partitions (`num_partitions`)."""
    partitions = num_partitions(buffer, num_classes)
    if buffer.rehearsal_ratio is not None:
        return math.floor(train_size * buffer.rehearsal_ratio / 100 / partitions / num_devices)
    if buffer.size is not None:
        return buffer.size // (partitions * num_devices)
    return buffer.budget_per_class


def num_partitions(buffer: ml_collections.ConfigDict, num_classes: int) -> int:
    """P: one partition per class, or one for the whole stream."""
    return num_classes if buffer.partition == "class" else 1


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
    if str(CONFIG_DIR.parent) not in sys.path:
        sys.path.append(str(CONFIG_DIR.parent))  # configs import each other as `configs.NAME`
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
            example = f", written like {_show(node[leaf])!r}" if node[leaf] is not None else ""
            reason = f" ({error})" if type_name not in ("tuple", "list") else ""
            raise ConfigError(
                f"{field}={text!r} is not a valid {type_name}{reason}; set --config.{field} to"
                f" a value of type {type_name}{example}"
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


def field_docs(config: ml_collections.ConfigDict) -> dict[str, str]:
    """The one-line meaning of every field of `config` (empty where none is written)."""
    docs = dict(FIELD_DOCS)
    for kind, registry in (("model", MODELS), ("strategy", STRATEGIES)):
        for name, cls in registry.items():
            for field in components.arguments(cls):
                docs[f"{kind}.{name}.{field.name}"] = field.metadata["doc"]
    return {field: docs.get(field, "") for field in flat_fields(config)}


def fields_table(config: ml_collections.ConfigDict, markdown: bool = False) -> str:
    """Every field of `config` with its value and meaning: the `--helpconfig` text, or the
    README's table."""
    values = flat_fields(config)
    docs = field_docs(config)
    if markdown:
        rows = [f"| `{f}` | `{_show(v)}` | {docs[f]} |" for f, v in values.items()]
        return "\n".join(["| field | default | meaning |", "| --- | --- | --- |", *rows])
    width = max(len(f"{f}={_show(v)}") for f, v in values.items())
    return "\n".join(f"{f + '=' + _show(v):<{width}}  {docs[f]}" for f, v in values.items())


def _short(values: list, shown: int = 8) -> str:
    """A list as text, cut after `shown` items."""
    if len(values) <= shown:
        return str(values)
    return f"[{', '.join(map(str, values[:shown]))}, ... ({len(values)} in all)]"


def _show(value) -> str:
    return str(tuple(value)) if isinstance(value, list) else str(value)
