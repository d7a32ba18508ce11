"""Sources, continual scenarios, the deterministic sampler and the prefetch thread."""

import json
import os
import sys
import threading
import time

import numpy as np
import pytest
from scipy import stats

from cljax import errors
from cljax.data import pipeline, prefetch, scenarios, sources, transforms
from tests.helpers import run_process


def test_digits_split_is_stratified_disjoint_and_complete(digits):
    assert len(digits.train) + len(digits.test) == 1797
    assert digits.input_dtype == np.uint8 and digits.input_shape == (8, 8, 1)
    assert digits.train.inputs.max() <= digits.max_value == 16
    train_share = np.bincount(digits.train.labels) / len(digits.train)
    test_share = np.bincount(digits.test.labels) / len(digits.test)
    np.testing.assert_allclose(train_share, test_share, atol=0.01)
    train_rows = {row.tobytes() for row in digits.train.inputs}
    overlap = sum(row.tobytes() in train_rows for row in digits.test.inputs)
    assert overlap < 0.02 * len(digits.test)


@pytest.mark.slow
def test_builtin_datasets_build_offline_without_tensorflow(tmp_path):
    """In a fresh process: both build, with the expected shapes, and TensorFlow stays out."""
    code = (
        "import json, sys\n"
        "from cljax.data import sources\n"
        "out = {}\n"
        "for name in ('digits', 'mnist1d'):\n"
        f"    d = sources.load(name, {str(tmp_path)!r})\n"
        "    out[name] = [len(d.train), len(d.test), list(d.input_shape), str(d.input_dtype),\n"
        "                 sorted(set(d.train.labels.tolist()))]\n"
        "out['tensorflow'] = 'tensorflow' in sys.modules\n"
        "print('RESULT', json.dumps(out))\n"
    )
    env = {**os.environ, "no_proxy": "*", "https_proxy": "http://127.0.0.1:9"}
    result = run_process(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert out["digits"][:4] == [1437, 360, [8, 8, 1], "uint8"]
    assert out["mnist1d"][:4] == [8000, 2000, [40, 1], "float32"]
    assert out["mnist1d"][4] == list(range(10))
    assert out["tensorflow"] is False


def test_unprepared_tfds_dataset_gives_one_line_with_the_prepare_command(tmp_path):
    with pytest.raises(errors.DatasetNotPrepared) as error:
        sources.load("mnist", str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert f"python -m cljax.data.prepare mnist --data_dir={tmp_path}" in message


def test_unknown_dataset_name_is_named_in_the_error(tmp_path):
    with pytest.raises(errors.DatasetNotPrepared, match=r"dataset\.name='no_such_set'"):
        sources.load("no_such_set", str(tmp_path))


def test_tfds_image_dataset_is_read_lazily_as_encoded_images(synthetic_data_dir):
    dataset = sources.load("synthetic_imagenet", synthetic_data_dir, image_size=16)
    assert dataset.encoded and dataset.natural_images and dataset.num_classes == 8
    assert dataset.input_shape == (16, 16, 3) and dataset.input_dtype == np.uint8
    assert len(dataset.train) == 128 and len(dataset.test) == 32
    assert sorted(np.bincount(dataset.train.labels).tolist()) == [16] * 8
    encoded = dataset.train.example(3)
    assert isinstance(encoded, bytes) and encoded[:2] == b"\xff\xd8"  # JPEG
    image = transforms.decode(encoded)
    assert image.dtype == np.uint8 and image.shape[2] == 3 and min(image.shape[:2]) >= 24
    views = pipeline.read_inputs(
        dataset.test, np.array([0, 5]), pipeline.Views("none", 16), dataset.input_shape
    )
    assert views.shape == (2, 16, 16, 3)


def test_images_of_varying_size_need_an_image_size(synthetic_data_dir):
    with pytest.raises(errors.DatasetNotPrepared, match=r"dataset\.image_size"):
        sources.load("synthetic_imagenet", synthetic_data_dir)


class TestScenarios:
    labels = np.repeat(np.arange(10), 7)
    test_labels = np.repeat(np.arange(10), 3)

    @pytest.mark.parametrize("shuffle_seed", [None, 3])
    def test_class_incremental_tasks_are_disjoint_and_cover_all_classes(self, shuffle_seed):
        scenario = scenarios.class_incremental(
            self.labels, self.test_labels, 10, 5, shuffle_seed=shuffle_seed
        )
        classes = np.concatenate(scenario.task_classes)
        assert sorted(classes.tolist()) == list(range(10))
        for task, task_classes in enumerate(scenario.task_classes):
            assert set(self.labels[scenario.train_rows[task]]) == set(task_classes)
            assert set(self.test_labels[scenario.test_rows[task]]) == set(task_classes)
        assert sorted(np.concatenate(scenario.train_rows).tolist()) == list(range(70))
        assert len(scenario.train_rows_up_to(2)) == 6 * 7
        if shuffle_seed is not None:
            assert not np.array_equal(classes, np.arange(10))

    def test_initial_increment_then_increment(self):
        scenario = scenarios.class_incremental(
            self.labels, self.test_labels, 10, 4, initial_increment=4, increment=2
        )
        assert [len(c) for c in scenario.task_classes] == [4, 2, 2, 2]

    def test_instance_incremental_chunks_are_disjoint_and_cover_the_splits(self):
        scenario = scenarios.instance_incremental(70, 30, 10, 4, seed=1)
        for rows, size in ((scenario.train_rows, 70), (scenario.test_rows, 30)):
            joined = np.concatenate(rows)
            assert sorted(joined.tolist()) == list(range(size))
            assert max(map(len, rows)) - min(map(len, rows)) <= 1
        assert all(len(c) == 10 for c in scenario.task_classes)

    def test_joint_is_one_task_with_everything(self):
        scenario = scenarios.joint(70, 30, 10)
        assert scenario.num_tasks == 1 and len(scenario.train_rows[0]) == 70


def test_epoch_order_depends_only_on_seed_task_and_epoch():
    rows = np.arange(100, 400)
    first = pipeline.epoch_order(rows, seed=1, task=2, epoch=3)
    np.testing.assert_array_equal(first, pipeline.epoch_order(rows, 1, 2, 3))
    for other in [(0, 2, 3), (1, 1, 3), (1, 2, 4)]:
        assert not np.array_equal(first, pipeline.epoch_order(rows, *other))
    assert sorted(first.tolist()) == rows.tolist()


def task_batches(split, rows, layout, views, seed, task, epochs, start=None) -> list:
    """The training batches of `task` (over `rows`) from `start`, as the pipeline plans them."""
    start = start or pipeline.Position(task=task)
    task_rows = (rows,) * (task + 1)
    loader = pipeline.Loader(
        train=split,
        test=split,
        task_rows=task_rows,
        layout=layout,
        views=views,
        input_shape=views_shape(split, views),
        seed=seed,
        eval_batch_size=layout.global_batch_size,
    )
    items = pipeline.plan(task_rows, 0, epochs, layout.global_batch_size, 1, start)
    return [loader(item) for item in items if item.kind == "train"]


def views_shape(split, views) -> tuple:
    if views.image_size is None:
        return split.inputs.shape[1:]
    return (views.image_size, views.image_size, views.channels)


def test_task_batches_cover_each_sample_once_per_epoch_with_a_masked_tail(digits):
    rows = np.flatnonzero(np.isin(digits.train.labels, [3, 7]))
    layout = pipeline.Layout(64)
    batches = task_batches(digits.train, rows, layout, pipeline.Views(), seed=0, task=0, epochs=2)
    assert len(batches) == 2 * pipeline.steps_per_epoch(len(rows), 64)
    assert all(len(batch["mask"]) == 64 for batch in batches)
    first_epoch = batches[: len(batches) // 2]
    labels = np.concatenate([b["labels"][b["mask"]] for b in first_epoch])
    assert sorted(labels.tolist()) == sorted(digits.train.labels[rows].tolist())
    assert not first_epoch[-1]["mask"].all()


def test_a_resumed_plan_gives_exactly_the_batches_not_yet_seen(digits):
    rows = np.arange(300)

    def batches(start: pipeline.Position):
        layout, views = pipeline.Layout(64), pipeline.Views()
        return task_batches(digits.train, rows, layout, views, 2, 3, 3, start)

    every = batches(pipeline.Position(task=3))
    per_epoch = pipeline.steps_per_epoch(300, 64)
    resumed = batches(pipeline.Position(task=3, epoch=1, step=2))
    assert len(resumed) == len(every) - per_epoch - 2
    for original, again in zip(every[per_epoch + 2 :], resumed, strict=True):
        for key in original:
            np.testing.assert_array_equal(original[key], again[key])


def test_the_plan_is_each_tasks_steps_then_its_evaluation_and_resumes_mid_run():
    task_rows = (np.arange(10), np.arange(5))
    items = pipeline.plan(task_rows, test_size=7, epochs=2, global_batch_size=4, eval_batch_size=3)
    kinds = [(item.kind, item.task, item.epoch, item.step, item.start) for item in items]
    train0 = [("train", 0, e, s, 0) for e in range(2) for s in range(3)]
    eval0 = [("eval", 0, 0, 0, r) for r in (0, 3, 6)]
    train1 = [("train", 1, e, s, 0) for e in range(2) for s in range(2)]
    eval1 = [("eval", 1, 0, 0, r) for r in (0, 3, 6)]
    assert kinds == train0 + eval0 + train1 + eval1
    resumed = pipeline.plan(task_rows, 7, 2, 4, 3, pipeline.Position(task=0, epoch=1, step=1))
    assert resumed == items[4:]
    next_task = pipeline.plan(task_rows, 7, 2, 4, 3, pipeline.Position(task=1))
    assert next_task == items[len(train0) + len(eval0) :]


def test_a_task_pass_comes_between_a_tasks_steps_and_its_evaluation_and_resumes():
    task_rows = (np.arange(10), np.arange(5))
    plain = pipeline.plan(task_rows, 7, 2, 4, 3)
    items = pipeline.plan(task_rows, 7, 2, 4, 3, task_pass=True)
    passes = [(item.task, item.start) for item in items if item.kind == "pass"]
    assert passes == [(0, 0), (0, 3), (0, 6), (0, 9), (1, 0), (1, 3)]
    assert [item for item in items if item.kind != "pass"] == plain
    first_pass = items.index(pipeline.Item("pass", 0, start=0))
    assert items[first_pass - 1].kind == "train" and items[first_pass + 4].kind == "eval"
    resumed = pipeline.plan(
        task_rows, 7, 2, 4, 3, pipeline.Position(task=0, epoch=1, step=1), task_pass=True
    )
    assert resumed == items[4:]


def test_a_pass_batch_holds_the_tasks_rows_in_order_with_labels_and_padding():
    train = sources.ArraySplit(np.arange(20, dtype=np.uint8).reshape(20, 1), np.arange(20) % 4)
    task_rows = (np.asarray([3, 5, 8, 13, 17]),)
    layout = pipeline.Layout(4, process_index=1, process_count=2)
    loader = pipeline.Loader(
        train, train, task_rows, layout, pipeline.Views(), (1,), seed=0, eval_batch_size=4
    )
    batch = loader(pipeline.Item("pass", 0, start=4))  # rows [17, (17, 17, 17) padding]
    np.testing.assert_array_equal(batch["inputs"][:, 0], [17, 17])
    np.testing.assert_array_equal(batch["labels"], [1, 1])
    np.testing.assert_array_equal(batch["valid"], [False, False])
    first = loader(pipeline.Item("pass", 0, start=0))  # process 1: rows 8 and 13
    np.testing.assert_array_equal(first["inputs"][:, 0], [8, 13])
    np.testing.assert_array_equal(first["labels"], [0, 1])
    assert first["valid"].all()


def test_varying_size_images_are_resized_and_centre_cropped():
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, 30:50] = 255
    square = transforms.resized_view(wide, 20)
    assert square.shape == (20, 20, 3)
    assert square[:, 10].min() == 255 and square[:, 0].max() == 0
    gray = transforms.resized_view(np.full((30, 10, 1), 7, np.uint8), 8)
    assert gray.shape == (8, 8, 1) and (gray == 7).all()
    evaluation = transforms.resized_view(wide, 20, crop_fraction=0.5)
    assert evaluation.shape == (20, 20, 3) and evaluation.min() == 255


def test_random_resized_crops_are_seeded_flipped_and_of_the_right_size():
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    first = transforms.random_resized_crop(image, 16, np.random.default_rng(4))
    again = transforms.random_resized_crop(image, 16, np.random.default_rng(4))
    np.testing.assert_array_equal(first, again)
    crops = [transforms.random_resized_crop(image, 16, np.random.default_rng(s)) for s in range(8)]
    assert all(crop.shape == (16, 16, 3) and crop.dtype == np.uint8 for crop in crops)
    assert len({crop.tobytes() for crop in crops}) == 8


def test_processes_read_disjoint_parts_whose_union_is_the_global_batch(digits):
    rows = np.arange(len(digits.train))

    def batches(process_index: int, process_count: int):
        layout = pipeline.Layout(48, process_index, process_count)
        return task_batches(digits.train, rows, layout, pipeline.Views(), seed=4, task=1, epochs=1)

    single = batches(0, 1)
    parts = [batches(p, 3) for p in range(3)]
    for step, whole in enumerate(single):
        for key in ("inputs", "labels", "mask"):
            joined = np.concatenate([part[step][key] for part in parts])
            np.testing.assert_array_equal(joined, whole[key])
        assert all(len(part[step]["mask"]) == 16 for part in parts)


def test_inception_batches_pick_candidates_and_do_not_depend_on_the_processes(
    synthetic_data_dir,
):
    """Random crops and candidates are seeded by global positions and devices: two
    processes of two devices read exactly the halves of one process of four."""
    dataset = sources.load("synthetic_imagenet", synthetic_data_dir, image_size=16)
    views = pipeline.Views("inception", 16)
    rows = np.arange(36)

    def batches(process_index: int, process_count: int):
        layout = pipeline.Layout(16, process_index, process_count, 4 // process_count, 2)
        return task_batches(dataset.train, rows, layout, views, seed=1, task=0, epochs=1)

    whole, halves = batches(0, 1), [batches(p, 2) for p in range(2)]
    assert len(whole) == 3
    for step, batch in enumerate(whole):
        for key in batch:
            joined = np.concatenate([half[step][key] for half in halves])
            np.testing.assert_array_equal(joined, batch[key])
        chosen = np.repeat(np.arange(4), 2) * 4 + batch["candidate_rows"]  # rows in the batch
        assert batch["candidate_rows"].shape == (8,) and (batch["candidate_rows"] < 4).all()
        for device in range(4):
            picks = chosen[2 * device : 2 * device + 2]
            assert len(set(picks.tolist())) == 2 and ((picks // 4) == device).all()
            valid = batch["mask"][4 * device : 4 * device + 4]
            assert batch["mask"][picks].sum() == min(2, valid.sum())
    last = whole[-1]
    assert not last["mask"].all()
    order = pipeline.epoch_order(rows, 1, 0, 0)
    device, slot = 0, 0
    row = order[32 + 4 * device + last["candidate_rows"][slot]]
    stored = views.stored(dataset.train.example(int(row)))
    np.testing.assert_array_equal(last["candidate_inputs"][slot], stored)


def test_candidates_are_drawn_uniformly_from_each_devices_valid_rows():
    """Over many steps every valid row of a device is picked equally often (chi-square)."""
    mask = np.array([True] * 6 + [False] * 2)
    layout = pipeline.Layout(8, local_devices=1, num_candidates=3)
    counts = np.zeros(8)
    for step in range(3000):
        counts[pipeline._pick_candidates(mask, layout, (0, 0, 0, step))] += 1
    assert counts[6:].sum() == 0
    assert stats.chisquare(counts[:6]).pvalue > 1e-4


def test_prefetcher_yields_every_item_in_order_and_bounds_its_queue():
    produced = []

    def items():
        for i in range(10):
            produced.append(i)
            yield i

    with prefetch.Prefetcher(items(), depth=2) as prefetcher:
        time.sleep(0.3)
        assert len(produced) <= 4
        assert list(prefetcher) == list(range(10))


def test_failure_in_the_prefetch_thread_reaches_the_consumer():
    def items():
        yield 0
        yield 1
        raise OSError("disk gone")

    prefetcher = prefetch.Prefetcher(items(), depth=2)
    received = []
    with pytest.raises(RuntimeError, match=r"data pipeline failed.*disk gone"), prefetcher:
        received.extend(prefetcher)
    assert received == [0, 1]


def test_closing_early_stops_the_thread():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    with prefetch.Prefetcher(endless(), depth=2) as prefetcher:
        assert next(prefetcher) == 0
    assert not any(
        t.name == prefetcher._thread.name and t.is_alive() for t in threading.enumerate()
    )
