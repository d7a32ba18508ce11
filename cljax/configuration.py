"""Configs: loading them by name or file, overriding fields, and what each field means.

The configs that ship with cljax are the modules of `configs/` (`cljax.configs` once
installed); each has `get_config(arg)` returning an `ml_collections.ConfigDict`. Checks of a
config's values are in `cljax.checks`; what the values imply for a run is its plan
(`cljax.run.plan`).
"""

import ast
import difflib
import importlib
import importlib.util
import pathlib
import sys
import types
from collections.abc import Mapping

import ml_collections

from cljax import augment, components, optim
from cljax.buffer import DRAWS, PARTITIONS, POLICIES
from cljax.checks import DTYPES
from cljax.data.scenarios import SCENARIOS
from cljax.data.sources import DATASETS
from cljax.errors import CljaxError, ConfigError
from cljax.models import MODELS
from cljax.strategies import STRATEGIES

CONFIGS_PACKAGE = "cljax.configs"
# A clone's configs: the folder beside the package (absent from an installed wheel).
CLONE_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"

# One line per config field; model.<name>.* and strategy.<name>.* come from the components.
FIELD_DOCS = {
    "seed": "seeds parameters, data order and every buffer decision (>= 0)",
    "num_cpu_devices": "simulated CPU devices of the whole run, split evenly over its"
    " processes (ignored on GPU)",
    "batch_size": "b: new samples per device per step",
    "eval_batch_size": "global batch of the evaluation pass",
    "epochs_per_task": "epochs over each task's training data",
    "steps_per_dispatch": "K: training steps run in one call on the devices (a scan over K"
    " batches placed together); the same results for every K; None: chosen from the time of"
    " the first steps (1 for steps of 50 ms or more)",
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
    "dataset.name": f"registered {DATASETS.names()} (digits and mnist1d: built-in, no"
    " download; imagefolder: the folder at dataset.path) or any TFDS image-classification"
    " dataset prepared as array_record (mnist, cifar10, imagenet2012, ...)",
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
    "scenario.name": f"one of {SCENARIOS.names()}",
    "scenario.num_tasks": "tasks (1 for joint)",
    "scenario.class_order_seed": "shuffle the class order with this seed (None: classes in order)",
    "scenario.initial_increment": "classes in the first task (None: an equal split)",
    "scenario.increment": "classes in each later task (None: an equal split)",
    "strategy.name": f"one of {STRATEGIES.names()}; strategy.<name>.* are its hyperparameters",
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
    "buffer.policy": f"one of {list(POLICIES)} (class_balanced: GDumb's, end_of_task:"
    " iCaRL's; both with partition=stream)",
    "buffer.draw": f"one of {list(DRAWS)}: how each owner draws its records for a device's"
    " representatives: uniformly with replacement (the paper's), or distinct slots (the DER"
    " paper's; while an owner holds fewer than r, all of them and the rest weigh 0)",
    "buffer.augment_from_task": "first task whose batches get representatives (the buffer"
    " fills from task 0)",
    "buffer.memory_kind": "where the buffer's slots live: device, or pinned_host (host"
    " memory; only the r drawn records move to the device)",
    "model.name": f"one of {MODELS.names()}; model.<name>.* are its arguments",
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


def load_config(spec: str = "default") -> ml_collections.ConfigDict:
    """The config of `spec`: `NAME[:ARG]` for the config `NAME` that ships with cljax
    (`configs/NAME.py`: the clone's, from any directory, or the installed package's), or
    `PATH.py[:ARG]` for any config file; ARG goes to its `get_config`."""
    name, _, argument = spec.partition(":")
    package = configs_package()
    if name.endswith(".py"):
        module = _module_from_file(pathlib.Path(name), spec)
    else:
        known = config_names()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(
                f"config={spec!r}: no config {name!r} in {package.__path__[0]}; {hint}give"
                f" --config=NAME[:ARG] with NAME one of {known}, or --config=PATH.py[:ARG]"
            )
        module = _imported(f"{CONFIGS_PACKAGE}.{name}", spec)
    try:
        return module.get_config(argument) if argument else module.get_config()
    except CljaxError:
        raise
    except Exception as error:
        raise ConfigError(_raised(spec, module.__file__, error)) from None


def _imported(module_name: str, spec: str) -> types.ModuleType:
    try:
        return importlib.import_module(module_name)
    except CljaxError:
        raise
    except Exception as error:
        raise ConfigError(_raised(spec, module_name, error)) from None


def _raised(spec: str, where: str, error: Exception) -> str:
    """The one line for a config file that raised: which file, and what."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (
        f"config={spec!r}: {where} raised {type(error).__name__}: {message}; fix the config"
        " file or give another --config"
    )


def configs_package() -> types.ModuleType:
    """`cljax.configs`, the configs that ship with cljax: the `configs/` folder of the clone
    this cljax runs from, or the copy that a wheel installs inside the package (the build
    maps the folder there; see pyproject.toml). Config files import each other from it."""
    if CONFIGS_PACKAGE not in sys.modules and (CLONE_CONFIGS / "__init__.py").is_file():
        init = CLONE_CONFIGS / "__init__.py"
        module_spec = importlib.util.spec_from_file_location(
            CONFIGS_PACKAGE, init, submodule_search_locations=[str(CLONE_CONFIGS)]
        )
        package = importlib.util.module_from_spec(module_spec)
        sys.modules[CONFIGS_PACKAGE] = package
        module_spec.loader.exec_module(package)
    return importlib.import_module(CONFIGS_PACKAGE)


def config_names() -> list[str]:
    """The names of the configs that ship with cljax."""
    folder = pathlib.Path(configs_package().__path__[0])
    return sorted(path.stem for path in folder.glob("*.py") if path.stem != "__init__")


def _module_from_file(path: pathlib.Path, spec: str) -> types.ModuleType:
    if not path.is_file():
        raise ConfigError(
            f"config={spec!r}: no config file {path}; give --config=PATH.py[:ARG] of an"
            f" existing file, or --config=NAME[:ARG] with NAME one of {config_names()}"
        )
    module_spec = importlib.util.spec_from_file_location(f"cljax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except CljaxError:
        raise
    except Exception as error:
        raise ConfigError(_raised(spec, str(path), error)) from None
    return module


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


def flat_fields(config: Mapping, prefix: str = "") -> dict[str, object]:
    """Every leaf field of a config (a `ConfigDict`, or its `to_dict()` as metrics.json and
    checkpoints keep it) by its dotted name, tuples as lists (as JSON gives them back)."""
    fields = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict | dict):
            fields.update(flat_fields(value, f"{name}."))
        else:
            fields[name] = list(value) if isinstance(value, tuple) else value
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


def _show(value) -> str:
    return str(tuple(value)) if isinstance(value, list) else str(value)
