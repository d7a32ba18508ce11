"""Real multi-process runs on this machine: jax.distributed (gloo) and mpirun (mpi4jax).

Each run is a short digits experiment; multi-process accuracy matrices must equal those of
a single process with the same global batch and seed.
"""

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax._src import distributed as jax_distributed

from cljax import runtime as runtime_lib
from tests.helpers import run_process, started, wait_for_line

pytestmark = pytest.mark.slow  # every test here trains or starts processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
# r = 3 leaves r mod D rows for the shifted permutes on 2 and 4 devices.
SHORT_RUN = [
    "--config.epochs_per_task=1",
    "--config.scenario.num_tasks=5",
    "--config.buffer.num_representatives=3",
]


def environment(data_dir: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env.update(TFDS_DATA_DIR=data_dir, PYTHON=sys.executable, CLJAX_PORT=str(free_port()))
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], env: dict[str, str], timeout: int = 400):
    result = run_process(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def accuracy(workdir) -> np.ndarray:
    with open(os.path.join(workdir, "metrics.json")) as file:
        return np.asarray(json.load(file)["accuracy_matrix"])


def single_process(tmp_path, env, devices: int, flags: list[str] = SHORT_RUN) -> np.ndarray:
    workdir = tmp_path / f"single{devices}"
    run(
        [
            sys.executable,
            "-m",
            "cljax.train",
            f"--workdir={workdir}",
            f"--config.num_cpu_devices={devices}",
            *flags,
        ],
        env,
    )
    return accuracy(workdir)


# The other strategies' runs: two tasks are enough to carry each one's state across a task.
TWO_TASKS = [*SHORT_RUN[:1], "--config.scenario.num_tasks=2", *SHORT_RUN[2:]]
GDUMB = [
    "--config.buffer.policy=class_balanced",
    "--config.buffer.partition=stream",
    "--config.buffer.size=80",
    "--config.strategy.gdumb.epochs=5",
]
ICARL = [
    "--config.buffer.policy=end_of_task",
    "--config.buffer.partition=stream",
    "--config.buffer.size=80",
]
STRATEGY_FLAGS = {"gdumb": GDUMB, "icarl": ICARL}


# ER, and a strategy with each hook of the step: tasks' classes (ER-ACE), gradients of named
# terms (A-GEM), a teacher in its own state (LwF), an end-of-task pass and a penalty on the
# parameters (online EWC), a retraining on the buffer (GDumb), a buffer chosen from a task's
# rows and an evaluation of its own (iCaRL).
@pytest.mark.parametrize(
    "strategy", ["er", "er_ace", "agem", "lwf", "ewc_online", "gdumb", "icarl"]
)
def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path, data_dir, strategy):
    """launch/local.sh 2 with no device flag splits the default 4 devices over 2 processes."""
    env = environment(data_dir)
    workdir = tmp_path / "jax2x2"
    flags = SHORT_RUN if strategy == "er" else [*TWO_TASKS, f"--config.strategy.name={strategy}"]
    flags = [*flags, *STRATEGY_FLAGS.get(strategy, [])]
    run(["bash", "launch/local.sh", "2", f"--workdir={workdir}", *flags], env)
    with open(workdir / "metrics.json") as file:
        metrics = json.load(file)
    assert metrics["num_devices"] == 4
    timing = metrics["task_timings"][0]
    assert timing["train_s_max"] >= timing["train_s"] > 0
    np.testing.assert_array_equal(accuracy(workdir), single_process(tmp_path, env, 4, flags))


def test_mpirun_with_the_mpi_backend_equals_one_process_of_two_devices(tmp_path, data_dir):
    pytest.importorskip("mpi4jax", reason="pip install -e '.[mpi]' (see README)")
    env = environment(data_dir)
    workdir = tmp_path / "mpi2"
    run(["bash", "launch/mpirun.sh", "2", f"--workdir={workdir}", *SHORT_RUN], env)
    with open(workdir / "metrics.json") as file:
        assert json.load(file)["num_devices"] == 2
    np.testing.assert_array_equal(accuracy(workdir), single_process(tmp_path, env, 2))


def test_overhead_benchmark_times_steps_across_mpirun_processes(data_dir):
    """Both processes of `mpirun -n 2` time the same steps of one mesh over their 4
    devices; only process 0 prints its line."""
    pytest.importorskip("mpi4py", reason="pip install -e '.[mpi]' (see README)")
    command = [f"{BIN}/mpirun", "-n", "2", sys.executable, "benchmarks/overhead.py"]
    quick = ["--rounds=1", "--replicas=1", "--steps_per_sample=1", "--min_sample_s=0"]
    result = run([*command, "--devices=4", "--cases", "mlp", *quick], environment(data_dir))
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(line["devices"], line["processes"]) for line in lines] == [(4, 2)]
    assert lines[0]["er_step_s"] > 0 and lines[0]["incremental_b_step_s"] > 0


def test_benchmark_devices_that_do_not_split_over_the_processes_stop_it(data_dir):
    pytest.importorskip("mpi4py", reason="pip install -e '.[mpi]' (see README)")
    command = [f"{BIN}/mpirun", "-n", "2", sys.executable, "benchmarks/overhead.py"]
    result = run_process(
        [*command, "--devices=3"],
        cwd=REPO,
        env=environment(data_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "--devices=3 cannot be split evenly over the 2 processes" in result.stderr


class KeyValueStore:
    """jax.distributed's key-value store, in memory: one for the processes of a test."""

    def __init__(self):
        self.values: dict[str, str] = {}

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        assert allow_overwrite or key not in self.values, f"{key} is set twice"
        self.values[key] = value

    def blocking_key_value_get(self, key: str, timeout_ms: int) -> str:
        return self.values[key]


def test_every_broadcast_reaches_a_process_that_reads_it_late(monkeypatch):
    """Process 0 broadcasts twice before process 1 reads: process 1 gets both, in order."""
    runtimes = {index: runtime_lib.JaxRuntime(timeout_s=1) for index in (0, 1)}
    monkeypatch.setattr(jax_distributed.global_state, "client", KeyValueStore())
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    received = {}
    for index, runtime in runtimes.items():
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        monkeypatch.setattr(runtime_lib, "_exchange_numbers", itertools.count(1))
        received[index] = [runtime.broadcast_text(f"{text} of {index}") for text in "ab"]
    assert received == {0: ["a of 0", "b of 0"], 1: ["a of 0", "b of 0"]}


def process_command(rank: int, port: int, timeout_s: int, workdir) -> list[str]:
    """Process `rank` of a 2-process training job that would run for ever."""
    return [
        sys.executable,
        "-m",
        "cljax.train",
        f"--workdir={workdir}",
        "--config.num_cpu_devices=4",
        "--config.epochs_per_task=100000",
        f"--config.distributed.timeout_s={timeout_s}",
        f"--config.distributed.log_dir={workdir}/logs",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={rank}",
    ]


PIPES = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}


def test_survivor_of_a_killed_process_stops_with_a_clear_error_within_the_timeout(
    tmp_path, data_dir
):
    env, timeout_s = environment(data_dir), 15
    port = int(env["CLJAX_PORT"])
    commands = [process_command(rank, port, timeout_s, tmp_path / "run") for rank in (0, 1)]
    with started(*commands, cwd=REPO, env=env, **PIPES) as (survivor, victim):
        wait_for_line(tmp_path / "run" / "logs" / "process_1.log", "first train step done", 120)
        assert survivor.poll() is None and victim.poll() is None, "both should still be training"
        victim.send_signal(signal.SIGKILL)
        _, stderr = survivor.communicate(timeout=timeout_s + 120)
    assert survivor.returncode == 3, stderr[-3000:]
    lines = stderr.strip().splitlines()
    # Stopped by the watchdog while a collective hangs, or by the loop when the collective
    # fails at once (which of the two depends on when the kill lands).
    assert re.match(r"cljax: process 0 (made no|stopped) training", lines[-1]), lines[-1]
    assert re.search(r"lost process 1\b", lines[-1]), lines[-1]
    assert len(lines) <= 2 and "Fatal Python error" not in stderr
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["status"] == "failed"
    assert written["error"] == lines[-1].removeprefix("cljax: ")


def test_a_process_that_cannot_reach_the_others_stops_within_the_timeout(tmp_path, data_dir):
    env, timeout_s = environment(data_dir), 5
    command = process_command(1, int(env["CLJAX_PORT"]), timeout_s, tmp_path / "run")
    with started(command, cwd=REPO, env=env, **PIPES) as (lonely,):
        _, stderr = lonely.communicate(timeout=timeout_s + 60)
    assert lonely.returncode != 0
    assert "cljax: joining a job of 2 processes" in stderr


def test_watchdog_stops_a_process_that_makes_no_progress_once_armed(tmp_path):
    code = (
        "import time\n"
        "from cljax.watchdog import Watchdog\n"
        "with Watchdog(timeout_s=1) as watchdog:\n"
        "    time.sleep(2.5)\n"
        "    print('not armed yet', flush=True)\n"
        "    watchdog.progress()\n"
        "    time.sleep(30)\n"
    )
    result = run_process([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert "not armed yet" in result.stdout
    assert "made no training progress" in result.stderr


# A key-value store in which process 1's post changes only after `$CHANGES_AFTER_S`
# (never when unset); process 1's first post is left over from an earlier run. Process 0's
# watchdog (`$TIMEOUT_S`, armed at once if `$ARMED`) watches while it sleeps `$RUN_S`, says
# it is still running, then sleeps `$THEN_S`; with `$FAIL`, its loop then fails as a
# collective whose peer died does, and the watchdog is asked whether a process was lost.
KEY_VALUE_STORE = """
import os, time
from cljax.watchdog import KeyValueLiveness, Watchdog

changes_after_s = float(os.environ.get("CHANGES_AFTER_S", "inf"))
started = time.monotonic()
class Store:
    posts = {"cljax/alive/1": "left by an earlier run"}
    def key_value_set(self, key, value, allow_overwrite=False):
        self.posts[key] = value
    def key_value_dir_get(self, prefix):
        if time.monotonic() - started > changes_after_s:
            self.posts["cljax/alive/1"] = repr(time.monotonic())
        return list(self.posts.items())
watchdog = Watchdog(timeout_s=float(os.environ.get("TIMEOUT_S", "2")))
watchdog.liveness = KeyValueLiveness(Store(), 0, 2)
try:
    with watchdog:
        if os.environ.get("ARMED"):
            watchdog.progress()
        time.sleep(float(os.environ.get("RUN_S", "6")))
        print("still running", flush=True)
        time.sleep(float(os.environ.get("THEN_S", "0")))
        if os.environ.get("FAIL"):
            raise RuntimeError("Gloo all-to-all failed: Connection closed by peer")
except RuntimeError as error:
    watchdog.stop_if_a_process_was_lost(error)
    print("the error is this process's own", flush=True)
"""


def watch(**variables: str) -> subprocess.CompletedProcess:
    """KEY_VALUE_STORE's process run with these variables."""
    return run_process(
        [sys.executable, "-c", KEY_VALUE_STORE],
        capture_output=True,
        text=True,
        env={**os.environ, **variables},
        timeout=60,
    )


@pytest.mark.parametrize("changes_after_s", [None, 1.0])
def test_watchdog_stops_before_the_first_progress_only_when_another_process_went_silent(
    changes_after_s,
):
    """Compiling the first step reports no progress; a silent peer must still stop the run,
    and a peer whose first post is old but which then posts must not."""
    variables = {} if changes_after_s is None else {"CHANGES_AFTER_S": str(changes_after_s)}
    result = watch(**variables)
    if changes_after_s is None:
        assert result.returncode == 3, result.stderr[-2000:]
        assert result.stderr.strip().startswith(
            "cljax: process 0 lost process 1 before its first training progress"
        )
        assert "still running" not in result.stdout
    else:
        assert result.returncode == 0, result.stderr[-2000:]
        assert "still running" in result.stdout


def test_an_armed_watchdog_waits_out_a_slow_live_process_but_not_a_silent_one():
    """A stall of timeout_s stops the run only when another process went silent; with every
    process alive (process 0 plotting alone, a loaded machine) it takes 3 x timeout_s."""
    alive = watch(CHANGES_AFTER_S="0", TIMEOUT_S="2", ARMED="1", RUN_S="3", THEN_S="30")
    assert alive.returncode == 3, alive.stderr[-2000:]  # stopped during THEN_S, not after
    assert "still running" in alive.stdout
    assert "while every process is alive: the job is stuck" in alive.stderr
    silent = watch(TIMEOUT_S="3", ARMED="1", RUN_S="30")
    assert silent.returncode == 3, silent.stderr[-2000:]
    assert "still running" not in silent.stdout  # stopped during RUN_S
    assert "(distributed.timeout_s=3.0): lost process 1;" in silent.stderr


def test_a_failed_collective_names_the_lost_process_only_when_one_went_silent():
    """A collective whose peer was killed can fail at once instead of hanging: the run then
    stops with status 3 naming the silent process (not Python's shutdown, whose
    jax.distributed barrier aborts); with every process alive the error stays its own."""
    silent = watch(ARMED="1", RUN_S="0.5", FAIL="1")
    assert silent.returncode == 3, silent.stderr[-2000:]
    assert silent.stderr.strip().startswith("cljax: process 0 stopped training: lost process 1")
    assert "(Gloo all-to-all failed: Connection closed by peer)" in silent.stderr
    assert "its own" not in silent.stdout
    alive = watch(CHANGES_AFTER_S="0", ARMED="1", RUN_S="0.5", FAIL="1")
    assert alive.returncode == 0, alive.stderr[-2000:]
    assert "the error is this process's own" in alive.stdout


def test_two_local_jobs_started_together_pick_their_own_ports(tmp_path, data_dir):
    env = environment(data_dir)
    del env["CLJAX_PORT"]
    flags = ["--config.scenario.name=joint", "--config.scenario.num_tasks=1"]
    commands = [
        ["bash", "launch/local.sh", "2", f"--workdir={tmp_path}/job{i}", *flags] for i in range(2)
    ]
    with started(*commands, cwd=REPO, env=env, **PIPES) as jobs:
        for job in jobs:
            _, stderr = job.communicate(timeout=400)
            assert job.returncode == 0, stderr[-3000:]
    assert accuracy(tmp_path / "job0").shape == accuracy(tmp_path / "job1").shape == (1, 1)


def test_the_local_launcher_names_a_port_in_use(data_dir):
    env = environment(data_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env["CLJAX_PORT"] = str(taken.getsockname()[1])
        result = run_process(
            ["bash", "launch/local.sh", "2"], cwd=REPO, env=env, capture_output=True, text=True
        )
    assert result.returncode == 2
    assert result.stderr.startswith(f"launch/local.sh: port {env['CLJAX_PORT']} (CLJAX_PORT)")
    assert result.stderr.count("\n") == 1
