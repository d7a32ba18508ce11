"""Continual scenarios: the training and test samples of each task.

- `class_incremental`: each task brings new classes (`initial_increment` classes first,
  then `increment` per task), in order or shuffled by a seed; a task's test split is the
  test samples of its classes.
- `instance_incremental`: every task has every class; the training set (and the test set)
  is split into T disjoint chunks, shuffled by a seed.
- `joint`: one task with all the data, the offline upper bound.
"""

import dataclasses

import numpy as np

SCENARIOS = ("class_incremental", "instance_incremental", "joint")


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
