"""Nothing a user ran is lost or misreported: bad image files, full disks, a corrupt run in a
report, config files that raise, a field given twice, warnings for input that makes a run
but probably not the one meant."""

import errno
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from cljax import configuration, errors, report
from cljax.data import imagefolder, sources, synthetic
from cljax.run import plan as planning
from tests.helpers import REPO, run_process, started
from tests.test_input_pipeline import SPEC, read_all, run_loader
from tests.test_robustness import cli


@pytest.fixture
def damaged_folder(tmp_path) -> pathlib.Path:
    """An image folder with a zero-byte JPEG among its training images, a symbolic link in a
    loop and one to nowhere."""
    root = pathlib.Path(synthetic.write_imagefolder(str(tmp_path / "images"), SPEC))
    first_class = sorted((root / "train").iterdir())[0]
    (first_class / "empty.jpg").write_bytes(b"")
    os.symlink("loop.jpg", first_class / "loop.jpg")
    os.symlink("nowhere", root / "val" / first_class.name / "gone.jpg")
    return root


def test_a_zero_byte_jpeg_is_skipped_and_named_or_stops_the_run_in_one_line(damaged_folder):
    dataset = sources.load("imagefolder", image_size=16, path=str(damaged_folder))
    loader, items = run_loader(dataset, bad_images="skip")
    skipped = {name for batch in read_all(loader, items, 0, "threads") for name in batch["skipped"]}
    assert any(name.endswith("empty.jpg") for name in skipped)
    loader, items = run_loader(dataset, bad_images="stop")
    with pytest.raises(errors.DataError, match=r"empty\.jpg cannot be decoded \(an empty file\)"):
        read_all(loader, items, 0, "threads")


def test_symbolic_links_in_a_loop_or_to_nowhere_are_counted_and_left_out(damaged_folder, capfd):
    train, test, _ = imagefolder.load(str(damaged_folder))
    warning = capfd.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("cljax: warning: 2 entries of")
    assert "loop.jpg" in warning[0] or "gone.jpg" in warning[0]
    files = [train.describe(row) for row in range(len(train))] + [
        test.describe(row) for row in range(len(test))
    ]
    assert not any(name.endswith(("loop.jpg", "gone.jpg")) for name in files)
    assert len(train) == 4 * 6 + 1 and len(test) == 4 * 3  # the empty JPEG is a file


@pytest.mark.parametrize(
    ("error", "what"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/w/metrics.json"), "metrics.json"),
        (
            ValueError(
                'Error writing "x" in OCDBT database at local file "/w/checkpoints/7.tmp/d/ab":'
                " Failed to write 8 bytes: No space left on device [os_error_code='28']"
            ),
            "a checkpoint",
        ),
        (OSError(errno.EDQUOT, "Disk quota exceeded", "/w/plots/a.png"), "the plots"),
    ],
)
def test_a_write_that_no_retry_fixes_is_one_line_naming_the_path_and_what(error, what):
    assert errors.write_failure(RuntimeError("not a write"), "/w") is None
    try:
        raise RuntimeError("while saving") from error
    except RuntimeError as wrapped:
        failure = errors.write_failure(wrapped, "/w")
    assert isinstance(failure, errors.WriteFailed)
    assert str(failure).startswith(f"cannot write {what} at /w/")
    assert "\n" not in str(failure)


def mount_tmpfs(path: pathlib.Path, size: str) -> bool:
    """A tmpfs of `size` at `path`, where the machine allows it."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    return mounted.returncode == 0


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_what_was_written_before(tmp_path, data_dir):
    """On a 3 MB tmpfs (or, where no file system can be mounted, with a file-size limit of
    256 KB on the run's process), the default experiment cannot write a checkpoint."""
    disk = tmp_path / "disk"
    mounted = mount_tmpfs(disk, "3m")
    limit = [] if mounted else ["prlimit", f"--fsize={256 << 10}"]
    try:
        command = [
            *limit,
            sys.executable,
            "-m",
            "cljax.train",
            f"--workdir={disk / 'run'}",
            f"--config.dataset.data_dir={data_dir}",
        ]
        result = run_process(command, cwd=REPO, env=os.environ | {"XLA_FLAGS": ""})
        assert result.returncode == errors.EXIT_FAILED
        lines = (result.stdout + result.stderr).strip().splitlines()
        assert lines[-1].startswith("cljax: cannot write ") and "Traceback" not in result.stderr
        assert ("No space left on device" if mounted else "File too large") in lines[-1]
        assert len(result.stderr.strip().splitlines()) == 1
        # The last complete metrics.json stays; it says `failed` where the disk had room.
        written = json.loads((disk / "run" / "metrics.json").read_text())
        assert written["status"] in ("failed", "running") and written["completed_tasks"] >= 1
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)])


def metrics_of(strategy: str, seed: int, dataset: str = "digits") -> dict:
    config = configuration.load_config(f"default:{strategy}").to_dict()
    config["seed"], config["dataset"]["name"] = seed, dataset
    matrix = [[0.5 + 0.1 * seed]]
    return {
        "status": "finished",
        "config": config,
        "accuracy_matrix": matrix,
        "final_average_accuracy": matrix[0][0],
        "average_forgetting": 0.0,
        "train_time_s": 10.0 + seed,
        "completed_tasks": 1,
    }


def write_runs(root: pathlib.Path, runs: dict[str, dict | str]) -> None:
    for name, content in runs.items():
        (root / name).mkdir(parents=True)
        text = content if isinstance(content, str) else json.dumps(content)
        (root / name / "metrics.json").write_text(text)


def test_the_report_names_a_corrupt_run_and_reports_the_others(tmp_path, capsys):
    write_runs(
        tmp_path / "runs",
        {
            "er-0": metrics_of("er", 0),
            "er-1": metrics_of("er", 1),
            "broken": '{"status": "fini',
        },
    )
    report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "broken/metrics.json cannot be read" in captured.err
    assert captured.out.splitlines()[1].split()[:2] == ["er", "2"]


def test_the_report_never_compares_runs_of_different_datasets(tmp_path, capsys):
    write_runs(
        tmp_path / "runs",
        {
            "er-digits": metrics_of("er", 0),
            "incremental-digits": metrics_of("incremental", 0),
            "er-mnist": metrics_of("er", 0, dataset="mnist"),
        },
    )
    groups = report.group_runs(report.find_runs([str(tmp_path / "runs")]))
    table = report.format_table(groups)
    assert table.count("(not comparable with the other settings)") == 2
    mnist = next(group for group in groups if "mnist" in group["setting"])
    assert mnist["time_vs_incremental"] is None  # no incremental run of its own setting
    assert all(len(group["label"]) < 60 for group in groups)


def test_report_labels_name_at_most_three_fields_by_their_last_names(tmp_path):
    runs = {}
    for index in range(2):
        metrics = metrics_of("er", 0)
        config = metrics["config"]
        config["buffer"]["budget_per_class"] = 5 + index
        config["optimizer"]["learning_rate"] = 0.1 + index
        config["batch_size"] = 4 + index
        config["dataset"]["data_dir"] = "/a/very/long/path/to/the/data" + str(index)
        config["epochs_per_task"] = 5 + index
        runs[f"er-{index}"] = metrics
    write_runs(tmp_path / "runs", runs)
    groups = report.group_runs(report.find_runs([str(tmp_path / "runs")]))
    assert groups[0]["label"] == "er (batch_size=4, budget_per_class=5, epochs_per_task=5, +1 more)"


def test_a_config_file_that_raises_is_one_line_naming_it(tmp_path):
    config_file = tmp_path / "broken.py"
    config_file.write_text("import ml_collections\n\ndef get_config():\n    return 1 / 0\n")
    result = cli(f"--config={config_file}")
    assert result.returncode == errors.EXIT_BAD_INPUT
    assert result.stderr == (
        f"cljax: config='{config_file}': {config_file} raised ZeroDivisionError: division by"
        " zero; fix the config file or give another --config\n"
    )


def test_a_field_given_twice_is_one_line():
    result = cli("--config.seed=1", "--config.seed=2")
    assert result.returncode == errors.EXIT_BAD_INPUT
    assert result.stderr == "cljax: --config.seed is given twice ('1', then '2'); give it once\n"


def test_sigterm_before_the_first_step_exits_75_with_one_line(tmp_path):
    """A config file that takes its time to load: SIGTERM arrives while it loads."""
    config_file = tmp_path / "slow.py"
    config_file.write_text(
        "import time\nfrom cljax.configs import default\n\n"
        "def get_config():\n    print('loading', flush=True)\n    time.sleep(60)\n"
        "    return default.get_config()\n"
    )
    command = [sys.executable, "-m", "cljax.train", f"--config={config_file}"]
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with started(command, cwd=REPO, **output) as (process,):
        assert process.stdout.readline() == "loading\n"
        process.terminate()
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == errors.EXIT_PREEMPTED
    assert stderr == (
        "cljax: SIGTERM before the first training step: nothing was saved; run the same"
        " command to start again\n"
    )


def test_inputs_smaller_than_the_models_reduction_and_oversized_batches_are_warned(digits, capfd):
    config = configuration.load_config()
    config.model.name, config.batch_size = "resnet50", 400
    scenario = sources_scenario(digits, config)
    planning._warn_of_mismatches(config, digits, scenario, 1)
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(
        "cljax: warning: the 8-pixel inputs of digits are smaller than model.name=resnet50's"
    )
    assert lines[1].startswith("cljax: warning: the global batch (400 x 1 devices = 400)")
    config.model.name, config.batch_size = "mlp", 4
    planning._warn_of_mismatches(config, digits, scenario, 4)
    assert capfd.readouterr().err == ""


def sources_scenario(dataset, config):
    from cljax.data import scenarios

    return scenarios.build(config.scenario, dataset, config.seed)


def test_the_leftover_check_finds_a_process_a_test_left_behind():
    from tests.conftest import SESSION_MARK, marked_processes

    def marked() -> set[int]:
        return {pid for pid, _ in marked_processes(os.environ[SESSION_MARK])}

    with started(["sleep", "60"]) as (process,):
        # Until it runs `sleep`, the new process still shows pytest's command line (which
        # the check leaves out): on a loaded machine that can last a moment.
        deadline = time.monotonic() + 10
        while process.pid not in marked() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.pid in marked()
    assert process.pid not in marked()
