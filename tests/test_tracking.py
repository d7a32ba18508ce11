"""What a run shows while it runs: its console output, its TensorBoard and W&B files."""

import glob
import pathlib
import re
import signal
import subprocess
import sys

import pytest

from tests.helpers import REPO, run_process, subprocess_env, tensorboard_scalars

pytestmark = pytest.mark.slow  # every test here trains or starts processes

TABLE_LINE = re.compile(r"^(top\d accuracy|task_il accuracy|after \\ on|\s+T\d+ )")


def train(workdir, data_dir, *flags: str) -> subprocess.CompletedProcess:
    result = run_process(
        [sys.executable, "-m", "cljax.train", f"--workdir={workdir}", *flags],
        cwd=REPO,
        env=subprocess_env(TFDS_DATA_DIR=str(data_dir)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_first_default_run_prints_few_lines_and_no_library_logging(tmp_path):
    """The default run with an empty data dir (so digits is built first): at most 10 lines
    besides the accuracy tables, none of them a library's log."""
    result = train(tmp_path / "run", tmp_path / "data")
    lines = (result.stdout + result.stderr).splitlines()
    own = [line for line in lines if not TABLE_LINE.match(line)]
    assert len(lines) - len(own) == 3 * (1 + 1 + 5)  # top-1, top-5, task-IL: title, header, rows
    assert not [
        line
        for line in lines
        if re.search(r"INFO|^[IW]\d{4} |absl|(Downloading and|downloaded and) prepar", line)
    ], lines
    assert len(own) <= 10, own
    assert own[0].startswith("Building dataset digits")


def test_wandb_offline_writes_its_run_with_no_network(tmp_path, data_dir):
    workdir = tmp_path / "run"
    train(
        workdir,
        data_dir,
        "--config.epochs_per_task=1",
        "--config.logging.wandb_project=cljax-test",
        "--config.logging.wandb_mode=offline",
    )
    run_id = (workdir / "wandb_id").read_text().strip()
    (run_file,) = glob.glob(
        str(workdir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb")
    )
    written = pathlib.Path(run_file).read_bytes()  # W&B's records keep their keys as text
    for key in ("strategy.name", "train/loss", "perf/samples_per_s", "top1/average_accuracy"):
        assert key.encode() in written, key


# Writes 40 scalars at each of steps 1 to 3, flushes as before a checkpoint, and is killed.
KILLED_AFTER_FLUSH = """
import os, signal, sys
import ml_collections
from cljax.tracking import Tracker

logging_config = ml_collections.ConfigDict({"wandb_project": None})
tracker = Tracker(sys.argv[1], logging_config, {"seed": 0}, ["final"], True, first_step=0)
for step in (1, 2, 3):
    tracker.scalars(step, {f"tag{index}": step for index in range(40)})
tracker.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_run_killed_right_after_a_flush_leaves_every_point_it_flushed(tmp_path):
    """What is flushed before a checkpoint must be on disk when the process dies."""
    result = run_process(
        [sys.executable, "-c", KILLED_AFTER_FLUSH, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    scalars = tensorboard_scalars(tmp_path)
    assert scalars == {f"tag{index}": [(1, 1.0), (2, 2.0), (3, 3.0)] for index in range(40)}
