"""End-to-end training on digits with 8 devices: strategies order as the method predicts."""

import json

import numpy as np
import pytest

from cljax import configuration, trainer


def digits_config(data_dir: str, strategy: str):
    """The default experiment on 8 devices: per-device batch 2 keeps the global batch of 8."""
    config = configuration.load_config()
    config.num_cpu_devices = 8
    config.dataset.data_dir = data_dir
    config.strategy.name = strategy
    config.batch_size = 2
    config.buffer.budget_per_class = 3
    config.buffer.num_candidates = 2
    config.buffer.num_representatives = 2
    return config


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> dict:
    return {
        strategy: tmp_path_factory.mktemp(strategy)
        for strategy in ("incremental", "er", "derpp", "from_scratch")
    }


@pytest.fixture(scope="module")
def results(data_dir, workdirs):
    return {
        strategy: trainer.train_and_evaluate(digits_config(data_dir, strategy), str(workdir))
        for strategy, workdir in workdirs.items()
    }


def test_strategies_order_from_scratch_over_er_over_incremental(results):
    accuracy = {name: run["final_average_accuracy"] for name, run in results.items()}
    assert accuracy["from_scratch"] > accuracy["er"]
    assert accuracy["er"] > accuracy["incremental"] + 0.3
    assert accuracy["incremental"] < 0.3
    assert results["er"]["average_forgetting"] < results["incremental"]["average_forgetting"]


def test_derpp_rehearses_as_well_as_er(results):
    accuracy = {name: run["final_average_accuracy"] for name, run in results.items()}
    assert accuracy["derpp"] > accuracy["incremental"] + 0.3
    assert accuracy["derpp"] > accuracy["er"] - 0.05


def test_incremental_forgets_earlier_tasks_almost_entirely(results):
    acc = np.asarray(results["incremental"]["accuracy_matrix"])
    assert (np.diag(acc) > 0.85).all()
    assert acc[-1, :-1].max() < 0.2


def test_written_metrics_equal_returned_metrics(results, workdirs):
    for name, run in results.items():
        written = json.loads((workdirs[name] / "metrics.json").read_text())
        assert written["accuracy_matrix"] == run["accuracy_matrix"]
        assert written["num_devices"] == 8


def test_rerunning_into_a_finished_workdir_is_refused(results, data_dir, workdirs):
    with pytest.raises(configuration.ConfigError, match=r"already holds metrics\.json"):
        trainer.train_and_evaluate(digits_config(data_dir, "er"), str(workdirs["er"]))


def test_tfds_image_dataset_trains_end_to_end_with_augmentation(tmp_path, synthetic_data_dir):
    """A TFDS array_record dataset of JPEG images, read lazily, augmented on the device,
    through a CNN, with top-1 and top-5 matrices."""
    config = configuration.load_config("default:er")
    config.num_cpu_devices = 8
    config.dataset.name = "synthetic_cifar"
    config.dataset.data_dir = synthetic_data_dir
    config.model.name = "cnn"
    config.model.cnn.channels = (8,)
    config.model.cnn.dense_size = 16
    config.scenario.num_tasks = 2
    config.epochs_per_task = 1
    config.batch_size = 2
    run = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    acc = np.asarray(run["accuracy_matrix"])
    top5 = np.asarray(run["top5_accuracy_matrix"])
    assert acc.shape == top5.shape == (2, 2) and ((acc >= 0) & (acc <= 1)).all()
    assert (top5 >= acc).all()
    assert run["config"]["model"]["name"] == "cnn"
    assert run["config"]["dataset"]["augment"] == "crop_flip"
    assert len(run["task_timings"]) == 2 and run["data_wait_s"] >= 0
