"""The plan of a run: everything it will do, resolved once from the config, the data and the
devices.

`plan(config, runtime, workdir)` opens the run's directory, loads the dataset, builds the
scenario and the strategy, makes every check that needs the data or the devices and derives
every value the config implies (the buffer's slots per partition, the global batches, the
input workers, the augmentation, the schedule). Later phases read the frozen `Plan`, never
the config: the config is checked once, here and in `cljax.checks`.
"""

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping

import jax
import ml_collections
import numpy as np

from cljax import optim, workdir
from cljax.buffer import RehearsalBuffer, record_bytes, rehearsal_buffer
from cljax.checks import require, validate_memory_kind
from cljax.data import pipeline, scenarios, sources
from cljax.errors import warn
from cljax.models import MODELS
from cljax.runtime import Runtime
from cljax.strategies import Strategy
from cljax.strategies import build as build_strategy

TOP_K = 5
# The accuracy of predictions restricted to each test sample's own task's classes.
TASK_IL = "task_il"


@dataclasses.dataclass(frozen=True)
class Inputs:
    """How the input pipeline makes the run's batches."""

    views: pipeline.Views
    layout: pipeline.Layout
    eval_batch_size: int
    steps_per_item: int
    worker_count: int
    workers: str
    prefetch_depth: int
    bad_images: str

    @property
    def global_batch_size(self) -> int:
        return self.layout.global_batch_size


@dataclasses.dataclass(frozen=True)
class Cadence:
    """What happens between steps, every so many steps of the run."""

    checkpoint_every_steps: int
    checkpoints_kept: int
    log_every_steps: int
    profile_from_step: int | None
    profile_steps: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run resolved (see the module docstring)."""

    workdir: workdir.Workdir
    dataset: sources.Dataset
    scenario: scenarios.Scenario
    task_rows: tuple[np.ndarray, ...]
    strategy: Strategy
    buffer: RehearsalBuffer | None
    stored: dict[str, jax.ShapeDtypeStruct]
    augment_from_task: int
    model: ml_collections.FrozenConfigDict
    dtype: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_smoothing: float
    optimizer: ml_collections.FrozenConfigDict
    schedule: optim.Schedule
    inputs: Inputs
    cadence: Cadence
    logging: ml_collections.FrozenConfigDict
    log_dir: str | None
    seed: int
    epochs_per_task: int
    steps_per_dispatch: int | None
    init_from: str | None
    accuracies: tuple[str, ...]
    class_tasks: np.ndarray | None
    resolved_config: dict

    @property
    def num_tasks(self) -> int:
        return self.scenario.num_tasks

    @property
    def global_batch_size(self) -> int:
        return self.inputs.global_batch_size

    @property
    def task_steps(self) -> list[int]:
        """Training steps of each task."""
        return [
            self.epochs_per_task * pipeline.steps_per_epoch(len(rows), self.global_batch_size)
            for rows in self.task_rows
        ]


@contextlib.contextmanager
def plan(
    config: ml_collections.ConfigDict, runtime: Runtime, path: str | None = None
) -> Iterator[Plan]:
    """The run's plan, its directory (a new one under runs/ if `path` is None) open and
    locked while the context lasts."""
    validate_memory_kind(config.buffer.memory_kind, runtime.memory_kinds())
    with _open_workdir(config, runtime, path) as directory:
        yield _resolve(config, runtime, directory)


def _open_workdir(config, runtime: Runtime, path: str | None) -> workdir.Workdir:
    """The run's directory, agreed by all processes; opened (checked and locked) on
    entering it."""
    created = path is None
    if created:
        default = (
            workdir.default_path(config.dataset.name, config.strategy.name)
            if runtime.is_main
            else None
        )
        path = runtime.broadcast_text(default)
    return workdir.Workdir(path, is_main=runtime.is_main, created=created)


def _resolve(config, runtime: Runtime, directory: workdir.Workdir) -> Plan:
    devices = runtime.num_devices
    dataset = _load_dataset(config.dataset, runtime)
    _check_for_data(config, dataset)
    scenario = scenarios.build(config.scenario, dataset, config.seed)
    _warn_of_mismatches(config, dataset, scenario, devices)
    strategy = build_strategy(config.strategy)
    stored = {
        "inputs": jax.ShapeDtypeStruct(dataset.input_shape, dataset.input_dtype),
        **strategy.stored_fields(dataset.num_classes),
    }
    buffer = None
    if strategy.uses_buffer:
        buffer = _buffer(config.buffer, dataset, devices, strategy.buffer_draws)
    if buffer is not None:
        _check_buffer_memory(config.buffer, buffer, stored, runtime)
    views = pipeline.Views(
        pipeline.resolve_augmentation(config.dataset.augment, dataset), dataset.image_size
    )
    inputs = Inputs(
        views=views,
        layout=pipeline.Layout(
            global_batch_size=config.batch_size * devices,
            process_index=runtime.process_index,
            process_count=runtime.process_count,
            local_devices=len(runtime.mesh.local_devices),
            num_candidates=buffer.num_candidates if buffer and views.crops_on_host else 0,
        ),
        eval_batch_size=-(-config.eval_batch_size // devices) * devices,
        steps_per_item=pipeline.steps_per_item(
            dataset.train,
            views,
            config.batch_size * devices // runtime.process_count * record_bytes(stored),
        ),
        worker_count=pipeline.resolve_worker_count(
            config.dataset.worker_count, dataset, runtime.cores_of_this_process()
        ),
        workers=config.dataset.workers,
        prefetch_depth=config.dataset.prefetch_depth,
        bad_images=config.dataset.bad_images,
    )
    mean = tuple(config.dataset.mean or dataset.mean)
    std = tuple(config.dataset.std or dataset.std)
    top_k = min(TOP_K, dataset.num_classes)
    accuracies = ("top1", f"top{top_k}") if dataset.num_classes > TOP_K else ("top1",)
    class_tasks = scenario.class_tasks(dataset.num_classes)
    require(
        class_tasks is not None or not strategy.needs_task_classes,
        f"strategy.name={config.strategy.name!r} needs tasks with classes of their own, and"
        f" scenario.name={config.scenario.name!r} with {scenario.num_tasks} task(s) has none;"
        " use a class-incremental scenario of 2 tasks or more (--config.scenario.name)",
    )
    return Plan(
        workdir=directory,
        dataset=dataset,
        scenario=scenario,
        task_rows=tuple(
            scenario.train_rows_up_to(task) if strategy.trains_on_seen_tasks else rows
            for task, rows in enumerate(scenario.train_rows)
        ),
        strategy=strategy,
        buffer=buffer,
        stored=stored,
        augment_from_task=config.buffer.augment_from_task,
        model=ml_collections.FrozenConfigDict(config.model),
        dtype=config.dtype,
        mean=mean,
        std=std,
        label_smoothing=config.label_smoothing,
        optimizer=ml_collections.FrozenConfigDict(config.optimizer),
        schedule=optim.schedule(
            config.optimizer, devices, config.epochs_per_task, scenario.num_tasks
        ),
        inputs=inputs,
        cadence=Cadence(
            checkpoint_every_steps=config.checkpoint.every_steps,
            checkpoints_kept=config.checkpoint.keep,
            log_every_steps=config.logging.every_steps,
            profile_from_step=config.logging.profile_from_step,
            profile_steps=config.logging.profile_steps,
        ),
        logging=ml_collections.FrozenConfigDict(config.logging),
        log_dir=config.distributed.log_dir,
        seed=config.seed,
        epochs_per_task=config.epochs_per_task,
        steps_per_dispatch=config.steps_per_dispatch,
        init_from=config.init_from,
        accuracies=accuracies if class_tasks is None else (*accuracies, TASK_IL),
        class_tasks=class_tasks,
        resolved_config=_resolved_config(config, buffer, dataset, devices, inputs, mean, std),
    )


def _load_dataset(section: Mapping, runtime: Runtime) -> sources.Dataset:
    """The dataset of a config's `dataset` section; process 0 loads it first (building a
    missing built-in one), then the others."""

    def load() -> sources.Dataset:
        return sources.load(
            section["name"], section["data_dir"], section["image_size"], section["path"]
        )

    dataset = load() if runtime.is_main else None
    runtime.barrier("cljax-dataset-loaded")
    return dataset if dataset is not None else load()


def _check_for_data(config, dataset: sources.Dataset) -> None:
    """The checks that depend on the dataset."""
    channels = dataset.input_shape[-1]
    for field in ("mean", "std"):
        value = config.dataset[field]
        require(
            value is None
            or (
                len(value) == channels
                and all(isinstance(v, int | float) and math.isfinite(v) for v in value)
                and (field == "mean" or min(value) > 0)
            ),
            f"dataset.{field}={value!r} must hold {channels} finite numbers (positive for"
            f" std), one per channel of {config.dataset.name}; set --config.dataset.{field} or"
            " leave it unset",
        )
    require(
        config.dataset.image_size is None or dataset.resizable,
        f"dataset.image_size={config.dataset.image_size} does not apply to"
        f" {config.dataset.name}, whose inputs have a fixed shape; unset"
        " --config.dataset.image_size",
    )


def _warn_of_mismatches(config, dataset: sources.Dataset, scenario, devices: int) -> None:
    """One warning line for input that makes a run, but probably not the one meant: inputs
    smaller than the model's reduction, a global batch larger than a whole task."""
    reduction = getattr(MODELS[config.model.name], "REDUCTION", 1)
    side = min(dataset.input_shape[:2]) if len(dataset.input_shape) == 3 else None
    if side is not None and side < reduction:
        warn(
            f"the {side}-pixel inputs of {config.dataset.name} are smaller than model.name="
            f"{config.model.name}'s {reduction}-fold reduction: its last feature maps hold less"
            " than a pixel of them; give larger images (dataset.image_size) or a smaller model"
            " (mlp, cnn)"
        )
    global_batch = config.batch_size * devices
    smallest = min(len(rows) for rows in scenario.train_rows)
    if global_batch > smallest:
        warn(
            f"the global batch ({config.batch_size} x {devices} devices = {global_batch}) is"
            f" larger than the smallest task's {smallest} training samples: its steps are mostly"
            " padding; lower --config.batch_size"
        )


def num_partitions(section: Mapping, num_classes: int) -> int:
    """P, the partitions of a config's `buffer` section: the classes, or one for the whole
    stream."""
    return num_classes if section["partition"] == "class" else 1


def budget_per_class(section: Mapping, train_size: int, num_classes: int, num_devices: int) -> int:
    """N, the slots per partition per device of a config's `buffer` section: from
    `rehearsal_ratio` if set, as in the paper (N = floor(train_size * ratio / 100 / P /
    num_devices)), else from `size` if set, else `budget_per_class`."""
    partitions = num_partitions(section, num_classes)
    if section["rehearsal_ratio"] is not None:
        return math.floor(train_size * section["rehearsal_ratio"] / 100 / partitions / num_devices)
    if section["size"] is not None:
        return section["size"] // (partitions * num_devices)
    return section["budget_per_class"]


def _buffer(
    section: Mapping, dataset: sources.Dataset, devices: int, draws: int
) -> RehearsalBuffer:
    """The buffer of a config's `buffer` section, its size checked against the data and the
    devices."""
    budget = budget_per_class(section, len(dataset.train), dataset.num_classes, devices)
    partitions = num_partitions(section, dataset.num_classes)
    field = "size" if section["rehearsal_ratio"] is None else "rehearsal_ratio"
    require(
        budget >= 1,
        f"buffer.{field}={section[field]} gives less than one slot per"
        f" {section['partition']} partition on each of {devices} devices; raise"
        f" --config.buffer.{field}",
    )
    total = budget * partitions * devices
    require(
        section["num_representatives"] <= total,
        f"buffer.num_representatives={section['num_representatives']} exceeds the {total} slots"
        f" of the whole buffer ({budget} per partition x {partitions} partitions x {devices}"
        " devices): every draw would repeat samples; lower --config.buffer.num_representatives"
        " or enlarge the buffer",
    )
    return rehearsal_buffer(
        num_classes=dataset.num_classes,
        budget_per_class=budget,
        num_candidates=section["num_candidates"],
        num_representatives=section["num_representatives"],
        policy=section["policy"],
        memory_kind=section["memory_kind"],
        partition=section["partition"],
        draw=section["draw"],
        draws=draws,
    )


def _check_buffer_memory(
    section: Mapping, buffer: RehearsalBuffer, stored: dict, runtime: Runtime
) -> None:
    """One device's buffer must fit in the memory it lives in."""
    needed = buffer.num_partitions * buffer.budget_per_class * record_bytes(stored)
    available, where = runtime.memory_per_device(buffer.memory_kind)
    require(
        needed <= available,
        f"the buffer needs {needed / 2**30:.1f} GiB per device (buffer.budget_per_class="
        f"{section['budget_per_class']}, size={section['size']}, rehearsal_ratio="
        f"{section['rehearsal_ratio']}), more than the {available / 2**30:.1f} GiB of"
        f" {where}; lower --config.buffer.budget_per_class, size or rehearsal_ratio",
    )


def _resolved_config(
    config,
    buffer: RehearsalBuffer | None,
    dataset: sources.Dataset,
    devices: int,
    inputs: Inputs,
    mean: tuple,
    std: tuple,
) -> dict:
    """The config as run: with the derived buffer sizes and the resolved input settings."""
    resolved = config.to_dict()
    budget = budget_per_class(config.buffer, len(dataset.train), dataset.num_classes, devices)
    resolved["buffer"]["budget_per_class"] = budget
    resolved["buffer"]["total_slots"] = (
        budget * num_partitions(config.buffer, dataset.num_classes) * devices
    )
    resolved["dataset"].update(
        augment=inputs.views.augmentation, mean=mean, std=std, worker_count=inputs.worker_count
    )
    return resolved
