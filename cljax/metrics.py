"""Continual-learning metrics from the accuracy matrix, and its printed table.

`acc[i, j]` is the test accuracy on task j after training task i. The matrix may hold
only the rows trained so far; forgetting and transfer are over the tasks trained before
the last row.
"""

import numpy as np


def average_accuracy(acc: np.ndarray) -> float:
    """Mean accuracy over all tasks after the last task."""
    return float(acc[-1].mean())


def average_forgetting(acc: np.ndarray) -> float:
    """Mean over earlier tasks of (best accuracy before the last row - final accuracy)."""
    trained = acc.shape[0]
    if trained < 2:
        return 0.0
    best_before_end = np.array([acc[j : trained - 1, j].max() for j in range(trained - 1)])
    return float((best_before_end - acc[-1, : trained - 1]).mean())


def backward_transfer(acc: np.ndarray) -> float:
    """Mean over earlier tasks of (final accuracy - accuracy just after learning it)."""
    trained = acc.shape[0]
    if trained < 2:
        return 0.0
    return float((acc[-1, : trained - 1] - np.diag(acc)[: trained - 1]).mean())


def summary(acc: np.ndarray) -> dict[str, float]:
    return {
        "final_average_accuracy": average_accuracy(acc),
        "average_forgetting": average_forgetting(acc),
        "backward_transfer": backward_transfer(acc),
    }


def format_matrix(acc: np.ndarray | list) -> str:
    """The accuracy matrix as a text table, one row per trained task."""
    acc = np.asarray(acc)
    num_tasks = acc.shape[1]
    header = "after \\ on " + "".join(f"{f'T{j}':>7}" for j in range(num_tasks)) + "    avg"
    rows = [
        f"{f'T{i}':>11}" + "".join(f"{value:7.3f}" for value in row) + f"{row.mean():7.3f}"
        for i, row in enumerate(acc)
    ]
    return "\n".join([header, *rows])
