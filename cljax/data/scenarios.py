"""Continual scenarios: the training and test samples of each task.

- `class_incremental`: each task brings new classes (`initial_increment` classes first,
  then `increment` per task), in order or shuffled by a seed; a task's test split is the
  test samples of its classes.
- `instance_incremental`: every task has every class; the training set (and the test set)
  is split into T disjoint chunks, shuffled by a seed.
- `joint`: one task with all the data, the offline upper bound.

Scenarios are chosen by `scenario.name` from the registry: `@register(NAME)` adds a function
`(section, dataset, seed) -> Scenario` (the config's `scenario` section, the loaded dataset,
the run's seed), from cljax or from the user's own code.
"""

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from cljax.data.sources import Dataset
from cljax.errors import ConfigError
from cljax.registry import Registry

SCENARIOS: Registry[Callable[..., "Scenario"]] = Registry("scenario", "scenario.name")
register = SCENARIOS.register


@dataclasses.dataclass(frozen=True)
class Scenario:
    """Per task: its classes, and its rows of the train and test splits."""

    task_classes: tuple[np.ndarray, ...]
    train_rows: tuple[np.ndarray, ...]
    test_rows: tuple[np.ndarray, ...]

    @property
    def num_tasks(self) -> int:
        return len(self.train_rows)

    def train_rows_up_to(self, task: int) -> np.ndarray:
        """Training rows of tasks 0..task, for strategies that retrain on everything seen."""
        return np.concatenate(self.train_rows[: task + 1])

    def class_tasks(self, num_classes: int) -> np.ndarray | None:
        """Each class's task, where task-IL accuracy means something: two tasks or more,
        each class in one task only (else None)."""
        classes = np.concatenate(self.task_classes)
        if self.num_tasks < 2 or len(np.unique(classes)) != len(classes):
            return None
        class_tasks = np.zeros(num_classes, np.int32)
        for task, task_classes in enumerate(self.task_classes):
            class_tasks[task_classes] = task
        return class_tasks


def build(section: Mapping, dataset: Dataset, seed: int) -> Scenario:
    """The scenario a config's `scenario` section names, over `dataset`; every task must
    have training and test samples (else its accuracy is undefined)."""
    scenario = SCENARIOS[section["name"]](section, dataset, seed)
    for task in range(scenario.num_tasks):
        for split, rows, size in (
            ("training", scenario.train_rows[task], len(dataset.train)),
            ("test", scenario.test_rows[task], len(dataset.test)),
        ):
            if len(rows) == 0:
                raise ConfigError(
                    f"scenario.num_tasks={section['num_tasks']} leaves task {task} without"
                    f" {split} samples ({dataset.name} has {size}); lower"
                    " --config.scenario.num_tasks"
                )
    return scenario


def class_order(num_classes: int, shuffle_seed: int | None) -> np.ndarray:
    if shuffle_seed is None:
        return np.arange(num_classes)
    return np.random.default_rng(shuffle_seed).permutation(num_classes)


def class_groups(
    num_classes: int, num_tasks: int, initial_increment: int | None, increment: int | None
) -> list[int]:
    """Classes per task: `initial_increment` first, then `increment` each (default: equal)."""
    if increment is None:
        rest = num_classes - (initial_increment or 0)
        tasks_left = num_tasks - (1 if initial_increment else 0)
        increment = rest // max(tasks_left, 1)
    first = initial_increment or increment
    return [first] + [increment] * (num_tasks - 1)


def class_incremental(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    num_tasks: int,
    *,
    initial_increment: int | None = None,
    increment: int | None = None,
    shuffle_seed: int | None = None,
) -> Scenario:
    sizes = class_groups(num_classes, num_tasks, initial_increment, increment)
    if sum(sizes) != num_classes:
        raise ValueError(f"task sizes {sizes} do not add up to {num_classes} classes")
    order = class_order(num_classes, shuffle_seed)
    groups = tuple(np.sort(group) for group in np.split(order, np.cumsum(sizes)[:-1]))
    return Scenario(
        task_classes=groups,
        train_rows=tuple(np.flatnonzero(np.isin(train_labels, g)) for g in groups),
        test_rows=tuple(np.flatnonzero(np.isin(test_labels, g)) for g in groups),
    )


def instance_incremental(
    train_size: int, test_size: int, num_classes: int, num_tasks: int, seed: int
) -> Scenario:
    def chunks(size: int, stream: int) -> tuple[np.ndarray, ...]:
        order = np.random.default_rng([seed, stream]).permutation(size)
        return tuple(np.sort(chunk) for chunk in np.array_split(order, num_tasks))

    every_class = np.arange(num_classes)
    return Scenario((every_class,) * num_tasks, chunks(train_size, 0), chunks(test_size, 1))


def joint(train_size: int, test_size: int, num_classes: int) -> Scenario:
    return Scenario((np.arange(num_classes),), (np.arange(train_size),), (np.arange(test_size),))


@register("class_incremental")
def _class_incremental(section: Mapping, dataset: Dataset, seed: int) -> Scenario:
    sizes = class_groups(
        dataset.num_classes,
        section["num_tasks"],
        section["initial_increment"],
        section["increment"],
    )
    if sum(sizes) != dataset.num_classes or min(sizes) < 1:
        raise ConfigError(
            f"scenario.num_tasks={section['num_tasks']} with initial_increment="
            f"{section['initial_increment']} and increment={section['increment']} gives tasks"
            f" of {_short(sizes)} classes, not the {dataset.num_classes} classes of"
            f" {dataset.name}; set --config.scenario.num_tasks (or initial_increment/increment)"
            " to cover them exactly"
        )
    return class_incremental(
        dataset.train.labels,
        dataset.test.labels,
        dataset.num_classes,
        section["num_tasks"],
        initial_increment=section["initial_increment"],
        increment=section["increment"],
        shuffle_seed=section["class_order_seed"],
    )


@register("instance_incremental")
def _instance_incremental(section: Mapping, dataset: Dataset, seed: int) -> Scenario:
    sizes = (len(dataset.train), len(dataset.test), dataset.num_classes)
    return instance_incremental(*sizes, section["num_tasks"], seed)


@register("joint")
def _joint(section: Mapping, dataset: Dataset, seed: int) -> Scenario:
    return joint(len(dataset.train), len(dataset.test), dataset.num_classes)


def _short(values: list, shown: int = 8) -> str:
    """A list as text, cut after `shown` items."""
    if len(values) <= shown:
        return str(values)
    return f"[{', '.join(map(str, values[:shown]))}, ... ({len(values)} in all)]"
