"""The digits source, the class-incremental scenario and the deterministic sampler."""

import numpy as np
import pytest

from cljax.data import pipeline, scenarios


def test_digits_split_is_stratified_disjoint_and_complete(digits):
    assert len(digits.train) + len(digits.test) == 1797
    assert digits.train.inputs.dtype == np.uint8 and digits.input_shape == (8, 8, 1)
    assert digits.train.inputs.max() <= digits.max_value == 16
    train_share = np.bincount(digits.train.labels) / len(digits.train)
    test_share = np.bincount(digits.test.labels) / len(digits.test)
    np.testing.assert_allclose(train_share, test_share, atol=0.01)
    train_rows = {row.tobytes() for row in digits.train.inputs}
    overlap = sum(row.tobytes() in train_rows for row in digits.test.inputs)
    assert overlap < 0.02 * len(digits.test)


@pytest.mark.parametrize("shuffle_seed", [None, 3])
def test_class_incremental_tasks_are_disjoint_and_cover_all_classes(shuffle_seed):
    scenario = scenarios.class_incremental(10, 5, shuffle_seed)
    classes = np.concatenate(scenario.task_classes)
    assert sorted(classes.tolist()) == list(range(10))
    assert all(len(task) == 2 for task in scenario.task_classes)
    labels = np.arange(10)
    for task, task_classes in enumerate(scenario.task_classes):
        assert (scenario.task_of_labels(task_classes) == task).all()
    assert len(scenario.classes_up_to(2)) == 6
    if shuffle_seed is not None:
        assert not np.array_equal(classes, labels)


def test_epoch_order_depends_only_on_seed_task_and_epoch():
    indices = np.arange(100, 400)
    first = pipeline.epoch_order(indices, seed=1, task=2, epoch=3)
    np.testing.assert_array_equal(first, pipeline.epoch_order(indices, 1, 2, 3))
    for other in [(0, 2, 3), (1, 1, 3), (1, 2, 4)]:
        assert not np.array_equal(first, pipeline.epoch_order(indices, *other))
    assert sorted(first.tolist()) == indices.tolist()


def test_epoch_batches_cover_each_sample_once_with_a_masked_tail(digits):
    indices = scenarios.indices_of_classes(digits.train.labels, np.array([3, 7]))
    batches = list(pipeline.epoch_batches(digits.train, indices, 64, seed=0, task=0, epoch=0))
    assert len(batches) == pipeline.steps_per_epoch(len(indices), 64)
    assert all(len(batch["mask"]) == 64 for batch in batches)
    labels = np.concatenate([batch["labels"][batch["mask"]] for batch in batches])
    assert len(labels) == len(indices)
    assert sorted(labels.tolist()) == sorted(digits.train.labels[indices].tolist())
    assert not batches[-1]["mask"].all()
