"""Test set-up: 8 simulated CPU devices (before JAX starts) and a persistent compile cache."""

import atexit
import os
import shutil
import signal
import tempfile
import time
import uuid

# Simulated devices are threads: on a loaded 2-core machine one can reach a collective late.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_collective_call_terminate_timeout_seconds=600"
)

import jax

NUM_DEVICES = 8

# Every process a test starts inherits this mark; once the whole suite is done, none may be
# alive (`pytest_sessionfinish`).
SESSION_MARK = "CLJAX_TEST_SESSION"
EXIT_GRACE_S = 15
os.environ.setdefault(SESSION_MARK, uuid.uuid4().hex)

# Indexes of test datasets (labels, file lists) stay with this session (and its children).
os.environ["CLJAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="cljax-test-cache-")
# The suite builds hundreds of programs once each: keeping them (`cljax.programs`) would export
# every one for no later run to read (test_steps and test_dispatch: 57 s against 49 s).
# tests/test_programs.py keeps them.
os.environ["CLJAX_KEEP_PROGRAMS"] = "0"
atexit.register(shutil.rmtree, os.environ["CLJAX_CACHE_DIR"], ignore_errors=True)

jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("CLJAX_TEST_CACHE", os.path.expanduser("~/.cache/cljax/jax-tests")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

import pytest  # noqa: E402

from cljax import runtime as runtime_lib  # noqa: E402
from cljax.data import sources  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A TFDS data dir of this test session, where built-in datasets get built."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def digits(data_dir) -> sources.Dataset:
    return sources.load("digits", data_dir)


@pytest.fixture(scope="session")
def runtime() -> runtime_lib.Runtime:
    """The 8 simulated devices of this process, as a run sees them."""
    assert jax.device_count() == NUM_DEVICES
    return runtime_lib.JaxRuntime(timeout_s=600)


@pytest.fixture(scope="session")
def mesh(runtime):
    return runtime.mesh


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir holding synthetic image datasets in array_record with JPEG images:
    `synthetic_imagenet` (8 classes, sides 24 to 48 pixels, 16 training and 4 test images
    per class) and `synthetic_cifar` (10 classes of 32x32 images, 8 and 2 per class)."""
    from cljax.data import synthetic

    data_dir = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.write_tfds("synthetic_imagenet", data_dir, synthetic.Spec(8, 16, 4, 24, 48))
    synthetic.write_tfds("synthetic_cifar", data_dir, synthetic.Spec(10, 8, 2, 32, 32))
    return data_dir


def pytest_sessionfinish(session, exitstatus) -> None:
    """Fails the suite, and ends them, if processes that tests started are still alive
    (checked by the controlling pytest process once every worker is done)."""
    if hasattr(session.config, "workerinput"):
        return
    leftovers = marked_processes(os.environ[SESSION_MARK])
    # A worker may still be exiting, and with it the helpers Python started for it
    # (multiprocessing's resource tracker): they get a few seconds to go.
    deadline = time.monotonic() + EXIT_GRACE_S
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)
        leftovers = marked_processes(os.environ[SESSION_MARK])
    for pid, _ in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    if leftovers:
        listed = "; ".join(f"{pid}: {command[:120]}" for pid, command in leftovers)
        print(f"\n{len(leftovers)} process(es) started by tests outlived them: {listed}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def marked_processes(mark: str) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes, other than pytest's own, whose
    environment holds this session's mark."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as file:
                environ = file.read()
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                command = file.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat") as file:
                state = file.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"{SESSION_MARK}={mark}".encode() not in environ.split(b"\0") or state == "Z":
            continue
        if "pytest" in command or "sys.stdin.readline()" in command:  # pytest and its workers
            continue
        found.append((int(entry), command))
    return found
