"""`python -m cljax.train`: the metrics.json contract and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cljax import checks, configuration, errors
from cljax.models import MODELS
from cljax.run import plan as planning
from tests.helpers import run_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*flags: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    return run_process(
        [sys.executable, "-m", "cljax.train", *flags],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_writes_well_formed_metrics_json(tmp_path, data_dir):
    result = run_cli(
        f"--config.dataset.data_dir={data_dir}",
        "--config.num_cpu_devices=2",
        "--config.epochs_per_task=1",
        "--config.scenario.num_tasks=2",
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    written = json.loads((run_dir / "metrics.json").read_text())
    acc = np.asarray(written["accuracy_matrix"])
    assert acc.shape == (2, 2) and ((acc >= 0) & (acc <= 1)).all()
    assert acc[0, 1] == 0.0 and acc[0, 0] > 0.9
    assert written["final_average_accuracy"] == pytest.approx(acc[-1].mean())
    assert written["average_forgetting"] == pytest.approx(acc[0, 0] - acc[1, 0])
    assert written["backward_transfer"] == pytest.approx(acc[1, 0] - acc[0, 0])
    assert 0 < written["train_time_s"] < written["wall_time_s"]
    assert written["num_devices"] == 2
    assert written["config"]["strategy"]["name"] == "er"
    assert written["config"]["buffer"]["total_slots"] == 5 * 10 * 2
    assert "after \\ on" in result.stdout and f"{acc[-1].mean():.3f}" in result.stdout


@pytest.mark.parametrize(
    ("flags", "start"),
    [
        (["--config.buffer.num_candidates=99"], "buffer.num_candidates="),
        (["--config.strategy.name=ewc"], "strategy.name="),
        (["--config.scenario.num_tasks=3"], "scenario.num_tasks="),
        (["--config.buffer.rehearsal_ratio=0.01"], "buffer.rehearsal_ratio="),
        (["--config.model.name=cnn", "--config.model.cnn.dense_size=0"], "model.cnn.dense_size="),
        (["--config.model.cnn.dense_sizes=3"], "--config.model.cnn.dense_sizes is not a"),
        (["--config.model.batch_norm=sync"], "model.batch_norm="),
        (["--config.logging.profile_from_step=0"], "logging.profile_from_step="),
        (["--config.strategy.der.alpha=-1", "--config.strategy.name=der"], "strategy.der.alpha="),
        (
            [
                "--config.strategy.name=er_ace",
                "--config.scenario.name=joint",
                "--config.scenario.num_tasks=1",
            ],
            "strategy.name='er_ace' needs tasks",
        ),
        (["--config.strategy.name=gdumb"], "strategy.name='gdumb' needs buffer.policy="),
        (["--config.buffer.policy=class_balanced"], "buffer.policy='class_balanced' fills one"),
    ],
)
def test_bad_config_stops_with_one_line_naming_the_field(tmp_path, data_dir, flags, start):
    workdir = tmp_path / "run"
    result = run_cli(f"--config.dataset.data_dir={data_dir}", f"--workdir={workdir}", *flags)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"cljax: {start}") and "--config." in result.stderr
    assert not workdir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_registered_model_trains_from_the_cli(tmp_path, data_dir, model):
    workdir = tmp_path / "run"
    result = run_cli(
        f"--config.dataset.data_dir={data_dir}",
        f"--workdir={workdir}",
        f"--config.model.name={model}",
        "--config.num_cpu_devices=2",
        "--config.epochs_per_task=1",
        "--config.scenario.num_tasks=2",
        *SMALL_MODEL_FLAGS.get(model, []),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((workdir / "metrics.json").read_text())
    assert written["status"] == "finished" and written["config"]["model"]["name"] == model
    acc = np.asarray(written["accuracy_matrix"])
    assert acc.shape == (2, 2) and ((acc >= 0) & (acc <= 1)).all()


# Arguments that keep a model small enough for a quick end-to-end run on 8x8 digits.
SMALL_MODEL_FLAGS: dict[str, list[str]] = {
    "resnet18": ["--config.model.resnet18.width=4"],
    "resnet50": ["--config.model.resnet50.width=4"],
    "resnet18_cifar": ["--config.model.resnet18_cifar.width=4"],
    "ghostnet": ["--config.model.ghostnet.width=0.1"],
}


def test_config_files_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert configuration.load_config("default:der").strategy.name == "der"
    with pytest.raises(errors.ConfigError, match=r"^config='defualt'.*did you mean default"):
        configuration.load_config("defualt")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 0),
        ("optimizer.learning_rate", -1.0),
        ("buffer.num_representatives", 0),
        ("buffer.policy", "fifo"),
        ("model.name", "resnet"),
        ("dataset.name", ""),
        ("scenario.name", "domain_incremental"),
        ("dataset.prefetch_depth", 0),
    ],
)
def test_validate_names_each_bad_field(field, value):
    config = configuration.load_config()
    *parents, leaf = field.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[leaf] = value
    with pytest.raises(errors.ConfigError, match=rf"^{field}="):
        checks.validate(config)


def test_rehearsal_ratio_gives_the_papers_budget():
    buffer = configuration.load_config().buffer
    buffer.rehearsal_ratio = 10.0
    assert planning.budget_per_class(buffer, 1437, 10, 4) == 3
    buffer.rehearsal_ratio = None
    assert planning.budget_per_class(buffer, 1437, 10, 4) == buffer.budget_per_class


def test_unsupported_buffer_memory_kind_names_the_field_and_the_fix():
    with pytest.raises(errors.ConfigError) as error:
        checks.validate_memory_kind("pinned_host", ["device"])
    message = str(error.value)
    assert message.startswith("buffer.memory_kind='pinned_host' is not supported")
    assert "--config.buffer.memory_kind=device" in message
    checks.validate_memory_kind("pinned_host", ["device", "pinned_host"])
