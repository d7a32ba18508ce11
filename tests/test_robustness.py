"""Bad input gets one clear line before anything compiles; failed runs never exit 0, never
leave non-standard JSON, and never lose or overwrite another run's results."""

import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from cljax import configuration, errors, workdir
from tests.helpers import run_process, started, wait_for_line

REPO = pathlib.Path(__file__).resolve().parents[1]


def cli(*flags: str, cwd=None, env_extra=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `python -m cljax.train`. JAX logs every compilation, so a run that compiled
    anything cannot print a single line."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env.update({"JAX_LOG_COMPILES": "1", **(env_extra or {})})
    return run_process(
        [sys.executable, "-m", "cljax.train", *flags],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def strict_json(path) -> dict:
    """The file as JSON, refusing the NaN and Infinity tokens that strict parsers reject."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(pathlib.Path(path).read_text(), parse_constant=refuse)


@pytest.fixture
def damaged_data_dir(data_dir, tmp_path, request):
    """A copy of the session's digits data, damaged as `request.param` says."""
    copy = tmp_path / "tfds"
    shutil.copytree(pathlib.Path(data_dir) / "digits", copy / "digits")
    version = copy / "digits" / "1.0.0"
    if request.param == "truncated":
        shard = next(version.glob("digits-train.array_record-*"))
        shard.write_bytes(shard.read_bytes()[:70_000])
    else:
        (version / "dataset_info.json").unlink()
    return str(copy)


def _file_as_parent(tmp_path) -> str:
    parent = tmp_path / "a-file"
    parent.write_text("")
    return str(parent / "run")


BAD_INPUT = {
    "seed -1": (["--config.seed=-1"], "seed=-1 must be"),
    "missing config": (["--config=defualt"], "config='defualt': no config 'defualt'"),
    "unknown field": (["--config.batchsize=3"], "--config.batchsize is not a config field"),
    "value of the wrong type": (["--config.batch_size=abc"], "batch_size='abc' is not a valid"),
    "more tasks than test rows": (
        ["--config.scenario.name=instance_incremental", "--config.scenario.num_tasks=500"],
        "scenario.num_tasks=500 leaves task 360 without test samples",
    ),
    "r beyond the whole buffer": (
        ["--config.buffer.num_representatives=500"],
        "buffer.num_representatives=500 exceeds the 200 slots",
    ),
    "augment_from_task past the last task": (
        ["--config.buffer.augment_from_task=5"],
        "buffer.augment_from_task=5 is past the last task",
    ),
    "image_size on a fixed-shape dataset": (
        ["--config.dataset.image_size=32"],
        "dataset.image_size=32 does not apply to digits",
    ),
    "buffer larger than memory": (
        ["--config.buffer.budget_per_class=1000000000"],
        "the buffer needs",
    ),
    "imagefolder without a path": (
        ["--config.dataset.name=imagefolder", "--config.dataset.image_size=32"],
        "dataset.name='imagefolder' needs dataset.path",
    ),
    "imagefolder path that is not a folder": (
        [
            "--config.dataset.name=imagefolder",
            "--config.dataset.image_size=32",
            "--config.dataset.path=/no/such/folder",
        ],
        "dataset.path=/no/such/folder is not a folder",
    ),
    "bad_images neither stop nor skip": (
        ["--config.dataset.bad_images=ignore"],
        "dataset.bad_images='ignore' is not known; set --config.dataset.bad_images to one of",
    ),
    "coordinator without a port": (
        [
            "--config.distributed.coordinator_address=localhost",
            "--config.distributed.num_processes=2",
            "--config.distributed.process_id=0",
        ],
        "distributed.coordinator_address='localhost' is not HOST:PORT",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_before_anything_compiles(case, data_dir, tmp_path):
    flags, start = BAD_INPUT[case]
    run_dir = tmp_path / "run"
    result = cli(f"--config.dataset.data_dir={data_dir}", f"--workdir={run_dir}", *flags)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"cljax: {start}")
    assert not run_dir.exists()


def test_an_unwritable_workdir_is_named_before_anything_compiles(data_dir, tmp_path):
    result = cli(f"--config.dataset.data_dir={data_dir}", f"--workdir={_file_as_parent(tmp_path)}")
    assert result.returncode == 2
    assert re.fullmatch(
        r"cljax: workdir=\S+ is not writable \(Not a directory\);.*\n", result.stderr
    )


@pytest.mark.parametrize(
    ("damaged_data_dir", "start"),
    [
        ("truncated", "cljax: dataset file "),
        ("no_info", "cljax: dataset digits: "),
    ],
    indirect=["damaged_data_dir"],
)
def test_a_damaged_dataset_names_the_file_and_the_fix(damaged_data_dir, start, tmp_path):
    result = cli(f"--config.dataset.data_dir={damaged_data_dir}", f"--workdir={tmp_path}/r")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(start)
    assert f"remove {damaged_data_dir}/digits/1.0.0 and run again" in result.stderr


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_naming_where_and_marks_it_failed(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = cli(
        f"--config.dataset.data_dir={data_dir}",
        f"--workdir={run_dir}",
        "--config.optimizer.learning_rate=1e30",
        env_extra={"JAX_LOG_COMPILES": "0"},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert re.match(r"cljax: the loss became nan at task \d/5, epoch \d/5, step \d+/18;", lines[0])
    written = strict_json(run_dir / "metrics.json")
    assert written["status"] == "failed" and written["error"] == lines[0].removeprefix("cljax: ")


def long_run(run_dir, data_dir, log_dir):
    """A run that would train for ever, its process killed when the block ends."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    return started(
        [
            sys.executable,
            "-m",
            "cljax.train",
            f"--workdir={run_dir}",
            f"--config.dataset.data_dir={data_dir}",
            f"--config.distributed.log_dir={log_dir}",
            "--config.epochs_per_task=100000",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_valid_metrics(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    with long_run(run_dir, data_dir, tmp_path / "logs") as (process,):
        wait_for_line(tmp_path / "logs" / "process_0.log", "first train step done")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130
    assert stderr.strip().splitlines() == [
        f"cljax: interrupted; {run_dir}/metrics.json holds the 0 finished task(s)"
    ]
    assert strict_json(run_dir / "metrics.json")["status"] == "interrupted"


@pytest.mark.slow
def test_a_second_run_into_a_busy_workdir_stops_naming_the_holder(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    with long_run(run_dir, data_dir, tmp_path / "logs") as (first,):
        wait_for_line(tmp_path / "logs" / "process_0.log", "first train step done")
        result = cli(f"--config.dataset.data_dir={data_dir}", f"--workdir={run_dir}")
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert result.stderr.startswith(
            f"cljax: workdir={run_dir} is in use by process {first.pid}"
        )
        assert first.poll() is None
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=300)
    assert first.returncode == 130


def test_a_finished_run_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"status": "finished"}')
    with pytest.raises(errors.ConfigError, match=r"already holds metrics\.json"):
        workdir.Workdir(str(run_dir)).open()
    assert (run_dir / "metrics.json").read_text() == '{"status": "finished"}'


def test_default_workdirs_of_runs_started_in_the_same_second_differ(tmp_path):
    paths = {workdir.default_path("digits", "er", root=str(tmp_path)) for _ in range(3)}
    assert len(paths) == 3 and all(os.path.isdir(path) for path in paths)


def test_json_is_written_without_non_finite_numbers(tmp_path):
    directory = workdir.Workdir(str(tmp_path))
    directory.write_json("m.json", {"a": [float("nan"), 1.0], "b": float("inf"), "c": 2})
    assert strict_json(tmp_path / "m.json") == {"a": [None, 1.0], "b": None, "c": 2}


def test_json_written_by_two_threads_at_once_stays_whole(tmp_path):
    """The watchdog's thread may write metrics.json while the training loop does."""
    directory, failures = workdir.Workdir(str(tmp_path)), []

    def write(tag: str) -> None:
        try:
            for step in range(300):
                directory.write_json("m.json", {"by": tag, "step": step, "rows": [tag] * 500})
        except OSError as error:
            failures.append(error)

    writers = [threading.Thread(target=write, args=(tag,)) for tag in "ab"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert not failures
    written = strict_json(tmp_path / "m.json")
    assert written["step"] == 299 and written["rows"] == [written["by"]] * 500


@pytest.mark.slow
def test_backend_mpi_outside_mpirun_warns_in_one_line(data_dir, tmp_path):
    pytest.importorskip("mpi4py")
    result = cli(
        f"--config.dataset.data_dir={data_dir}",
        f"--workdir={tmp_path}/run",
        "--config.distributed.backend=mpi",
        "--config.epochs_per_task=1",
        env_extra={"JAX_LOG_COMPILES": "0"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.startswith("cljax: warning: distributed.backend='mpi' outside mpirun")
    assert result.stderr.count("\n") == 1


def test_helpconfig_lists_every_field_with_its_value_and_meaning():
    result = cli("--helpconfig", "--config=default:derpp", "--config.seed=7")
    assert result.returncode == 0
    lines = result.stdout.strip().splitlines()
    fields = configuration.flat_fields(configuration.load_config("default:derpp"))
    assert [line.split("=")[0] for line in lines] == list(fields)
    assert "seed=7 " in result.stdout and "strategy.name=derpp " in result.stdout
    assert all(len(line.split("  ")[-1].strip()) > 10 for line in lines)


def test_the_docs_list_every_config_field_as_helpconfig_does():
    table = configuration.fields_table(configuration.load_config(), markdown=True)
    reference = (REPO / "docs" / "configuration.md").read_text()
    assert table in reference, (
        "docs/configuration.md's table differs from the config; regenerate it with: python -c"
        " 'from cljax import configuration as c; print(c.fields_table(c.load_config(),"
        " markdown=True))'"
    )


def test_every_field_of_every_config_file_has_a_meaning():
    for name in configuration.config_names():
        docs = configuration.field_docs(configuration.load_config(name))
        undocumented = [field for field, doc in docs.items() if not doc]
        assert not undocumented, f"{name}: {undocumented}"


def test_strict_json_refuses_what_strict_parsers_refuse(tmp_path):
    (tmp_path / "bad.json").write_text('{"a": NaN}')
    with pytest.raises(ValueError, match="non-standard"):
        strict_json(tmp_path / "bad.json")
    assert math.isnan(json.loads('{"a": NaN}')["a"])
