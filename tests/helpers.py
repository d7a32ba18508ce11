"""Helpers shared by tests that run cljax in other processes."""

import contextlib
import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Iterator

REPO = pathlib.Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a child process, without the test session's XLA_FLAGS."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    return {**env, **extra}


def wait_for_line(path: pathlib.Path, text: str, timeout_s: float = 120) -> None:
    """Polls `path` until a line holds `text`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"no line with {text!r} in {path} after {timeout_s} s")


def tensorboard_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a run wrote to `<workdir>/tensorboard`, as (step, value) lists, read
    with TensorBoard's own reader (which drops what a resumed run purged)."""
    from tensorboard.backend.event_processing import event_accumulator

    reader = event_accumulator.EventAccumulator(
        os.path.join(workdir, "tensorboard"), size_guidance={event_accumulator.SCALARS: 0}
    )
    reader.Reload()
    return {
        tag: [(event.step, event.value) for event in reader.Scalars(tag)]
        for tag in reader.Tags()["scalars"]
    }


@contextlib.contextmanager
def started(*commands: list, **popen_kwargs) -> Iterator[list[subprocess.Popen]]:
    """The processes of `commands`, each in a process group of its own, killed with all that
    they started when the block ends, however it ends: no run outlives its test."""
    processes = []
    try:
        for command in commands:
            processes.append(subprocess.Popen(command, start_new_session=True, **popen_kwargs))
        yield processes
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_process(
    command: list, timeout: float = 900, capture_output: bool = True, text: bool = True, **kwargs
) -> subprocess.CompletedProcess:
    """`subprocess.run(command, ...)`, but in a process group of its own that is killed, with
    whatever the command started (a launcher's processes), when it ends or times out."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with started(command, text=text, **kwargs) as (process,):
        stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
