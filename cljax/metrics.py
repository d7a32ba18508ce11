"""Continual-learning metrics from the accuracy matrix, and its printed table.

`acc[i, j]` is the test accuracy on task j after training task i. The matrix may hold only
the rows trained so far (k rows): averages are over the k tasks seen, and forgetting and
transfer are over the tasks trained before the last row.
"""

import numpy as np


def average_accuracy(acc: np.ndarray) -> float:
    """Mean accuracy, after the last trained task, over the tasks seen so far."""
    trained = acc.shape[0]
    return float(acc[-1, :trained].mean())


def average_forgetting(acc: np.ndarray) -> float:
    """Mean over earlier tasks j of (best accuracy on j after any earlier task - final
    accuracy on j), as in Chaudhry et al. 2018: the best is over every row before the last."""
    trained = acc.shape[0]
    if trained < 2:
        return 0.0
    best_before_end = acc[: trained - 1, : trained - 1].max(axis=0)
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
    """The accuracy matrix as a text table, one row per trained task; the last column
    averages the tasks seen after that row's task."""
    acc = np.asarray(acc)
    num_tasks = acc.shape[1]
    header = "after \\ on " + "".join(f"{f'T{j}':>7}" for j in range(num_tasks)) + "    avg"
    rows = [
        f"{f'T{i}':>11}" + "".join(f"{value:7.3f}" for value in row) + f"{row[: i + 1].mean():7.3f}"
        for i, row in enumerate(acc)
    ]
    return "\n".join([header, *rows])
