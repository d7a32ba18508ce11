"""Every experiment config runs end to end from the CLI, at tiny scale, on synthetic data
in the on-disk form of its real dataset (TFDS array_record of JPEG images)."""

import json

import numpy as np
import pytest

from cljax import configuration
from tests.helpers import REPO
from tests.test_cli import run_cli

TINY = [
    "--config.epochs_per_task=1",
    "--config.batch_size=2",
    "--config.eval_batch_size=64",
    "--config.buffer.num_candidates=2",
    "--config.buffer.num_representatives=2",
    "--config.num_cpu_devices=2",
]
IMAGENET_LIKE = ["--config.dataset.name=synthetic_imagenet", "--config.dataset.image_size=32"]
CIFAR_LIKE = ["--config.dataset.name=synthetic_cifar"]
CASES = {
    "imagenet_resnet50": [*IMAGENET_LIKE, "--config.model.resnet50.width=4"],
    "imagenet_resnet50:from_scratch": [*IMAGENET_LIKE, "--config.model.resnet50.width=4"],
    "imagenet_resnet18": [*IMAGENET_LIKE, "--config.model.resnet18.width=4"],
    "imagenet_ghostnet": [*IMAGENET_LIKE, "--config.model.ghostnet.width=0.1"],
    "cifar10_der:derpp": [*CIFAR_LIKE, "--config.model.resnet18_cifar.width=4"],
    "cifar100_resnet18": [*CIFAR_LIKE, "--config.model.resnet18_cifar.width=4"],
}


# Configs run by other tests: on real data where it is at hand.
ELSEWHERE = {"mnist_der": "tests/test_mnist.py"}


def test_every_config_file_is_covered():
    names = set(configuration.config_names()) - {"default"}
    assert names == {case.split(":")[0] for case in CASES} | set(ELSEWHERE)
    for path in ELSEWHERE.values():
        assert (REPO / path).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_config_runs_end_to_end_with_top1_and_top5_matrices(case, synthetic_data_dir, tmp_path):
    workdir = tmp_path / "run"
    result = run_cli(
        f"--config={case}",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={synthetic_data_dir}",
        *TINY,
        *CASES[case],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((workdir / "metrics.json").read_text())
    top1 = np.asarray(written["accuracy_matrix"])
    top5 = np.asarray(written["top5_accuracy_matrix"])
    tasks = written["config"]["scenario"]["num_tasks"]
    assert written["status"] == "finished"
    assert top1.shape == top5.shape == (tasks, tasks) and (top5 >= top1).all()
    assert "top5 accuracy" in result.stdout
