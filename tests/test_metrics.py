"""Continual-learning metrics on accuracy matrices with known answers."""

import numpy as np
import pytest

from cljax import metrics

ACC = np.array(
    [
        [0.9, 0.0, 0.0],
        [0.6, 0.8, 0.0],
        [0.5, 0.7, 1.0],
    ]
)


def test_summary_of_a_known_matrix():
    summary = metrics.summary(ACC)
    assert summary["final_average_accuracy"] == pytest.approx((0.5 + 0.7 + 1.0) / 3)
    assert summary["average_forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert summary["backward_transfer"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)


def test_forgetting_uses_the_best_earlier_accuracy_not_the_first():
    acc = np.array([[0.5, 0.0], [0.9, 0.9], [0.6, 0.9]])
    assert metrics.average_forgetting(acc) == pytest.approx(((0.9 - 0.6) + 0.0) / 2)


def test_partial_matrix_rows_give_metrics_over_trained_tasks():
    partial = ACC[:2]
    assert metrics.average_forgetting(partial) == pytest.approx(0.9 - 0.6)
    assert metrics.backward_transfer(partial) == pytest.approx(0.6 - 0.9)
    assert metrics.average_accuracy(partial) == pytest.approx((0.6 + 0.8 + 0.0) / 3)


def test_table_has_a_row_per_trained_task_with_its_mean():
    lines = metrics.format_matrix(ACC).splitlines()
    assert len(lines) == 4
    assert lines[-1].split()[-1] == f"{ACC[-1].mean():.3f}"
