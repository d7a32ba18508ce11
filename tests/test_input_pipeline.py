"""Grain workers, image folders, cached indexes and undecodable images."""

import json
import os
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cljax import configuration, errors, trainer
from cljax.data import cache, imagefolder, pipeline, prefetch, sources, synthetic
from tests.test_robustness import cli

SPEC = synthetic.Spec(num_classes=4, train_per_class=6, test_per_class=3, min_size=24, max_size=40)


@pytest.fixture
def folder(tmp_path) -> pathlib.Path:
    """A fresh image folder in ImageNet's layout: 4 classes, 24 training and 12 val JPEGs."""
    return pathlib.Path(synthetic.write_imagefolder(str(tmp_path / "images"), SPEC))


def run_loader(dataset: sources.Dataset, bad_images: str = "stop", candidates: int = 1) -> tuple:
    """A loader of two tasks of inception-style batches with `candidates` per device (of 2),
    and its plan."""
    task_rows = tuple(np.flatnonzero(dataset.train.labels // 2 == task) for task in range(2))
    layout = pipeline.Layout(8, local_devices=2, num_candidates=candidates)
    loader = pipeline.Loader(
        train=dataset.train,
        test=dataset.test,
        task_rows=task_rows,
        layout=layout,
        views=pipeline.Views("inception", 16),
        input_shape=dataset.input_shape,
        seed=3,
        eval_batch_size=8,
        bad_images=bad_images,
    )
    return loader, pipeline.plan(task_rows, len(dataset.test), 2, 8, 8)


def read_all(loader, items, workers: int, kind: str) -> list[dict]:
    with prefetch.Prefetcher(pipeline.batches(loader, items, workers, kind)) as feed:
        return list(feed)


def test_image_folder_classes_are_its_sorted_subfolders(tmp_path):
    root = tmp_path / "images"
    for split, names in (("train", ["b_cat", "a_dog", "c_owl"]), ("val", ["c_owl", "a_dog"])):
        for name in names:
            (root / split / name).mkdir(parents=True)
            for index in range(2):
                (root / split / name / f"{index}.JPEG").write_bytes(b"")
    (root / "train" / "a_dog" / "notes.txt").write_text("not an image")
    train, test, classes = imagefolder.load(str(root))
    assert classes == ["a_dog", "b_cat", "c_owl"]
    assert [train.describe(row).split(os.sep)[-2:] for row in range(len(train))] == [
        [name, f"{index}.JPEG"] for name in classes for index in range(2)
    ]
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.labels.tolist() == [0, 0, 2, 2]


def _no_val(root: pathlib.Path) -> None:
    for path in sorted((root / "val").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (root / "val").rmdir()


def _empty_class(root: pathlib.Path) -> None:
    for path in (root / "train" / "class_0002").iterdir():
        path.unlink()


BAD_FOLDERS = {
    "missing folder": (lambda root: root / "nowhere", "is not a folder"),
    "no val folder": (lambda root: _no_val(root) or root, "needs a train/ and a val/ folder"),
    "empty class folder": (lambda root: _empty_class(root) or root, "class_0002 holds no images"),
    "val class not in train": (
        lambda root: (root / "val" / "zebra").mkdir() or root,
        "val/zebra is not one of train/'s 4 class folders",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_a_bad_image_folder_is_one_line_naming_the_fix(case, folder):
    damage, expected = BAD_FOLDERS[case]
    path = damage(folder)
    with pytest.raises(errors.DatasetError) as error:
        sources.load("imagefolder", image_size=16, path=str(path))
    assert "\n" not in str(error.value) and expected in str(error.value)


def test_the_index_is_cached_and_rebuilt_when_a_folder_changes(folder, monkeypatch, tmp_path):
    monkeypatch.setenv("CLJAX_CACHE_DIR", str(tmp_path / "cache"))
    scans = []
    scan = imagefolder._scan
    monkeypatch.setattr(imagefolder, "_scan", lambda *a: scans.append(a) or scan(*a))
    first = imagefolder.load(str(folder))
    again = imagefolder.load(str(folder))
    assert len(scans) == 1
    np.testing.assert_array_equal(first[0].files, again[0].files)
    np.testing.assert_array_equal(first[1].labels, again[1].labels)
    new = folder / "train" / "class_0001" / "zz_new.JPEG"
    new.write_bytes((folder / "train" / "class_0001").iterdir().__next__().read_bytes())
    train, _, _ = imagefolder.load(str(folder))
    assert len(scans) == 2 and len(train) == len(first[0]) + 1
    assert train.labels[list(train.files).index("class_0001/zz_new.JPEG")] == 1


def test_a_cache_entry_is_read_back_mapped_and_a_new_stamp_replaces_it(monkeypatch, tmp_path):
    monkeypatch.setenv("CLJAX_CACHE_DIR", str(tmp_path))
    first = cache.cached("kind", "key", "stamp-1", lambda: {"rows": np.arange(6).reshape(2, 3)})
    again = cache.cached("kind", "key", "stamp-1", lambda: pytest.fail("computed again"))
    assert isinstance(again["rows"], np.memmap) and not again["rows"].flags.writeable
    np.testing.assert_array_equal(again["rows"], first["rows"])
    cache.cached("kind", "key", "stamp-2", lambda: {"rows": np.arange(3), "more": np.ones(2)})
    again = cache.cached("kind", "key", "stamp-2", lambda: pytest.fail("computed again"))
    np.testing.assert_array_equal(again["rows"], np.arange(3))
    np.testing.assert_array_equal(again["more"], np.ones(2))
    assert len(os.listdir(tmp_path / "kind")) == 1  # no stale entry, no half-written one


def test_tfds_labels_are_read_once_then_from_the_cache(synthetic_data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("CLJAX_CACHE_DIR", str(tmp_path / "cache"))
    computed = []
    cached = cache.cached

    def counting(kind, key, stamp, compute):
        return cached(kind, key, stamp, lambda: computed.append(kind) or compute())

    monkeypatch.setattr(cache, "cached", counting)
    first = sources.load("synthetic_imagenet", synthetic_data_dir, image_size=16)
    assert computed == ["tfds-labels", "tfds-labels"]  # train and test
    again = sources.load("synthetic_imagenet", synthetic_data_dir, image_size=16)
    assert len(computed) == 2
    np.testing.assert_array_equal(first.train.labels, again.train.labels)
    records = tfds.data_source("synthetic_imagenet", split="train", data_dir=synthetic_data_dir)
    assert first.train.labels.tolist() == [records[i]["label"] for i in range(len(records))]


@pytest.mark.slow
@pytest.mark.parametrize("kind", pipeline.WORKER_KINDS)
def test_batches_are_the_same_with_any_number_of_workers(folder, kind):
    """Every training and evaluation batch of a two-task plan, crops and candidates
    included, is bit-identical with 0, 1 or 2 workers."""
    dataset = sources.load("imagefolder", image_size=16, path=str(folder))
    loader, items = run_loader(dataset)
    inline = read_all(loader, items, 0, kind)
    assert len(inline) == len(items) and {"candidate_inputs"} <= set(inline[0])
    for workers in (1, 2):
        batches = read_all(loader, items, workers, kind)
        assert len(batches) == len(inline)
        for expected, batch in zip(inline, batches, strict=True):
            assert set(batch) == set(expected)
            for key in expected:
                np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)


def _corrupt_one(folder: pathlib.Path) -> pathlib.Path:
    bad = sorted((folder / "train" / "class_0001").iterdir())[0]
    bad.write_bytes(b"\xff\xd8 this is not a JPEG")
    return bad


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "kind"), [(0, "threads"), (2, "threads"), (2, "processes")])
def test_an_undecodable_image_stops_the_feed_naming_its_file(folder, workers, kind):
    bad = _corrupt_one(folder)
    loader, items = run_loader(sources.load("imagefolder", image_size=16, path=str(folder)))
    with pytest.raises(errors.DataError) as error:
        read_all(loader, items, workers, kind)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{bad} cannot be decoded")
    assert "dataset.bad_images=skip" in message


def test_a_skipped_image_is_masked_out_and_named_never_given_a_label(folder):
    bad = _corrupt_one(folder)
    dataset = sources.load("imagefolder", image_size=16, path=str(folder))
    loader, items = run_loader(dataset, bad_images="skip", candidates=3)
    batches = read_all(loader, items, 2, "threads")
    train = [(item, b) for item, b in zip(items, batches, strict=True) if item.kind == "train"]
    skipped = [b for _, b in train if len(b["skipped"])]
    assert len(skipped) == 2  # task 0 (classes 0 and 1), once per epoch
    bad_row = list(dataset.train.files).index(f"class_0001/{bad.name}")
    for item, batch in train:
        if len(batch["skipped"]):
            assert batch["skipped"].tolist() == [str(bad)]
            order = pipeline.epoch_order(loader.task_rows[item.task], 3, item.task, item.epoch)
            rows = np.resize(order[item.step * 8 : (item.step + 1) * 8], 8)
            hit = np.flatnonzero(rows == bad_row)
            assert not batch["mask"][hit].any() and (batch["inputs"][hit] == 0).all()
            assert batch["mask"].sum() == min(8, len(order) - item.step * 8) - len(hit)
        for device in range(2):  # 3 candidates of 4 rows: as many valid ones as there are
            rows = 4 * device + batch["candidate_rows"][3 * device : 3 * device + 3]
            valid = batch["mask"][4 * device : 4 * device + 4].sum()
            assert len(set(rows.tolist())) == 3 and batch["mask"][rows].sum() == min(3, valid)


def _folder_overrides(folder: pathlib.Path) -> dict[str, str]:
    """A small run of a CNN over two tasks of the image folder, on 8 devices."""
    return {
        "num_cpu_devices": "8",
        "dataset.name": "imagefolder",
        "dataset.path": str(folder),
        "dataset.image_size": "16",
        "model.name": "cnn",
        "model.cnn.channels": "(8,)",
        "model.cnn.dense_size": "16",
        "scenario.num_tasks": "2",
        "epochs_per_task": "1",
        "batch_size": "2",
        "buffer.budget_per_class": "2",
        "buffer.num_candidates": "1",
        "buffer.num_representatives": "1",
    }


@pytest.mark.slow
def test_a_run_over_an_image_folder_reports_the_images_it_skipped(folder, tmp_path):
    bad = _corrupt_one(folder)
    config = configuration.load_config("default:er")
    overrides = {**_folder_overrides(folder), "dataset.bad_images": "skip"}
    configuration.apply_overrides(config, {**overrides, "dataset.worker_count": "2"})
    run = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["skipped_images"] == run["skipped_images"] == [str(bad)]
    assert written["status"] == "finished"
    assert np.asarray(run["accuracy_matrix"]).shape == (2, 2)


@pytest.mark.slow
def test_a_run_stops_at_an_undecodable_image_with_one_line(folder, tmp_path):
    bad = _corrupt_one(folder)
    flags = [f"--config.{field}={value}" for field, value in _folder_overrides(folder).items()]
    result = cli(*flags, f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"cljax: {bad} cannot be decoded")
    status = json.loads((tmp_path / "run" / "metrics.json").read_text())["status"]
    assert status == "failed"


def test_the_default_worker_count_leaves_a_core_to_the_training_loop(folder, digits, runtime):
    images = sources.load("imagefolder", image_size=16, path=str(folder))
    assert [pipeline.resolve_worker_count(None, images, cores) for cores in (1, 2, 17, 64)] == [
        1,
        1,
        16,
        16,
    ]
    assert pipeline.resolve_worker_count(None, digits, 64) == 0  # held in memory
    assert pipeline.resolve_worker_count(3, images, 64) == 3
    assert runtime.cores_of_this_process() == len(os.sched_getaffinity(0))
