"""Continual scenarios: which classes form each task, and which samples belong to it."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A sequence of tasks, each a set of class ids."""

    task_classes: tuple[np.ndarray, ...]

    @property
    def num_tasks(self) -> int:
        return len(self.task_classes)

    def classes_up_to(self, task: int) -> np.ndarray:
        """Every class of tasks 0..task."""
        return np.concatenate(self.task_classes[: task + 1])

    def task_of_labels(self, labels: np.ndarray) -> np.ndarray:
        """The task id of each label."""
        task_of_class = np.empty(max(c.max() for c in self.task_classes) + 1, np.int32)
        for task, classes in enumerate(self.task_classes):
            task_of_class[classes] = task
        return task_of_class[labels]


def class_incremental(
    num_classes: int, num_tasks: int, shuffle_seed: int | None = None
) -> Scenario:
    """Splits the classes into `num_tasks` equal groups, in order or shuffled by a seed."""
    order = np.arange(num_classes)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(num_classes)
    return Scenario(tuple(np.sort(group) for group in np.split(order, num_tasks)))


def indices_of_classes(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Positions of the samples whose label is in `classes`."""
    return np.flatnonzero(np.isin(labels, classes))
