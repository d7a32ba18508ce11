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


def test_forgetting_takes_the_best_over_every_earlier_row_including_before_the_task():
    """Instance-incremental runs can score on task j before training it (Chaudhry 2018)."""
    acc = np.array([[0.5, 0.7, 0.6], [0.6, 0.4, 0.5], [0.55, 0.45, 0.8]])
    expected = ((0.6 - 0.55) + (0.7 - 0.45)) / 2
    assert metrics.average_forgetting(acc) == pytest.approx(expected)


def test_partial_matrix_rows_give_metrics_over_seen_tasks():
    partial = ACC[:2]
    assert metrics.average_forgetting(partial) == pytest.approx(0.9 - 0.6)
    assert metrics.backward_transfer(partial) == pytest.approx(0.6 - 0.9)
    assert metrics.average_accuracy(partial) == pytest.approx((0.6 + 0.8) / 2)
    assert metrics.average_accuracy(ACC[:1]) == pytest.approx(0.9)


def test_table_has_a_row_per_trained_task_averaging_its_seen_tasks():
    lines = metrics.format_matrix(ACC).splitlines()
    assert len(lines) == 4
    assert [float(line.split()[-1]) for line in lines[1:]] == pytest.approx(
        [0.9, 0.7, 2.2 / 3], abs=5e-4
    )
