"""Checkpoints: a run killed anywhere and rerun with the same command ends bit-identical to
an uninterrupted one; SIGTERM saves and exits 75; resume on other device counts; corrupt
checkpoints, changed configs, the NaN guard and shared initial weights.

Runs are short digits experiments in their own processes (4 devices unless said), with a
checkpoint every 10 steps; kills come from tests/kill_at.py.
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cljax import buffer as buffer_lib
from cljax import checkpoint, configuration, errors, fingerprint, steps, trainer
from cljax.buffer import BufferState
from tests.helpers import (
    REPO,
    run_process,
    started,
    subprocess_env,
    tensorboard_scalars,
    wait_for_line,
)
from tests.test_multiprocess import STRATEGY_FLAGS, free_port

RUN = [
    "--config.epochs_per_task=2",
    "--config.checkpoint.every_steps=10",
    "--config.logging.every_steps=4",
    "--config.num_cpu_devices=4",
]
KILL_POINTS = ("step", "eval", "save")
# One step per call, so that `kill_at` counts steps (a test of blocks gives its own K).
ONE_STEP = "--config.steps_per_dispatch=1"


def train(workdir, *flags: str, kill_at: str | None = None, env=None, check=True):
    """One run of cljax.train (through tests/kill_at.py when `kill_at` is given)."""
    entry = ["tests/kill_at.py", kill_at] if kill_at else ["-m", "cljax.train"]
    given = {flag.split("=")[0] for flag in flags}
    defaults = [flag for flag in [*RUN, ONE_STEP] if flag.split("=")[0] not in given]
    result = run_process(
        [sys.executable, *entry, f"--workdir={workdir}", *defaults, *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert result.returncode == (-signal.SIGKILL if kill_at else 0), result.stderr[-3000:]
    return result


def metrics(workdir) -> dict:
    with open(os.path.join(workdir, "metrics.json")) as file:
        return json.load(file)


def assert_same_results(workdir, reference) -> None:
    ran, expected = metrics(workdir), metrics(reference)
    assert ran["status"] == "finished"
    for key in ("accuracy_matrix", "top5_accuracy_matrix"):
        assert ran[key] == expected[key], key
    jax.tree.map(
        np.testing.assert_array_equal,
        checkpoint.read(workdir, "rehearsal"),
        checkpoint.read(reference, "rehearsal"),
    )


@pytest.fixture(scope="module")
def env(data_dir) -> dict:
    return subprocess_env(TFDS_DATA_DIR=data_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env) -> dict[str, str]:
    """Uninterrupted runs, per buffer memory kind."""
    runs = {}
    for kind in ("device", "pinned_host"):
        runs[kind] = str(tmp_path_factory.mktemp("reference") / kind)
        train(runs[kind], f"--config.buffer.memory_kind={kind}", env=env)
    return runs


def kill_points(seed: int) -> list[str]:
    """One random kill per point: after the k-th train step, prediction batch or save."""
    rng = np.random.default_rng(seed)
    ranges = {"step": (5, 60), "eval": (1, 4), "save": (1, 4)}
    return [f"{point}:{rng.integers(*ranges[point])}" for point in KILL_POINTS]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["device", "pinned_host"])
def test_a_run_killed_three_times_ends_as_an_uninterrupted_one(tmp_path, env, reference, kind):
    workdir, flags = tmp_path / "run", [f"--config.buffer.memory_kind={kind}"]
    for kill_at in kill_points(seed=len(kind)):
        train(workdir, *flags, kill_at=kill_at, env=env)
    result = train(workdir, *flags, env=env)
    assert "resuming from" in result.stdout
    assert not re.findall(r"(?m)^[IWEF]\d{4} ", result.stderr)  # no library's raw log line
    assert metrics(workdir)["resumes"] >= 1
    assert_same_results(workdir, reference[kind])
    assert_same_scalars(workdir, reference[kind])


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy, kill_points",
    [
        ("lwf", ("step:45", "save:4")),
        ("ewc_online", ("pass:3", "step:45")),
        ("gdumb", ("step:95", "save:2")),  # step 95: in the retraining after task 1
        # step 50: in task 2, from either checkpoint the kill may leave (80, or 90 if written)
        ("icarl", ("rows:1", "step:50")),
    ],
)
def test_a_strategy_with_its_own_state_killed_twice_ends_as_an_uninterrupted_run(
    tmp_path, env, strategy, kill_points
):
    """A strategy's own state is in the checkpoints (LwF's teacher; online EWC's Fisher and
    anchor, made by a pass over each task's rows; iCaRL's class means and buffer, chosen from
    a task's rows), or its model is made after the task's steps (GDumb's retraining on the
    buffer): a run killed mid-task, during an end-of-task pass or retraining, or after a save
    resumes to the same accuracies and the same final state, the strategy's included."""
    flags = [
        f"--config.strategy.name={strategy}",
        "--config.eval_batch_size=128",
        "--config.scenario.num_tasks=2",
    ]
    flags += STRATEGY_FLAGS.get(strategy, [])
    reference, workdir = tmp_path / "reference", tmp_path / "run"
    train(reference, *flags, env=env)
    for kill_at in kill_points:
        train(workdir, *flags, kill_at=kill_at, env=env)
    assert "resuming from" in train(workdir, *flags, env=env).stdout
    ran, expected = metrics(workdir), metrics(reference)
    assert ran["resumes"] == 2 and ran["accuracy_matrix"] == expected["accuracy_matrix"]
    state = checkpoint.read(str(workdir), "state")
    assert state["strategy_state"] or strategy == "gdumb"  # GDumb keeps no state of its own
    jax.tree.map(np.testing.assert_array_equal, state, checkpoint.read(str(reference), "state"))
    if strategy not in ("lwf", "ewc_online"):  # the strategies with a buffer
        jax.tree.map(
            np.testing.assert_array_equal,
            checkpoint.read(str(workdir), "rehearsal"),
            checkpoint.read(str(reference), "rehearsal"),
        )


def assert_same_scalars(workdir, reference) -> None:
    """The killed run's TensorBoard files hold one point per logged step, as the
    uninterrupted run's do: the same steps and, but for timing, the same values."""
    ran, expected = tensorboard_scalars(workdir), tensorboard_scalars(reference)
    assert ran.keys() == expected.keys()
    for tag, points in expected.items():
        steps = [step for step, _ in points]
        assert [step for step, _ in ran[tag]] == steps, tag
        if tag.startswith(("train/", "top1/", "top5/")):
            np.testing.assert_array_equal(ran[tag], points, err_msg=tag)


@pytest.mark.slow
def test_a_two_process_run_killed_three_times_ends_as_one_process(tmp_path, env, reference):
    """2 processes x 2 devices, process 0 killed at each point (process 1 then stops on its
    own, lost its peer), rerun after each: the one-process, four-device results."""
    workdir = tmp_path / "run"

    def both(kill_at: str | None) -> None:
        port = free_port()
        flags = [
            "--config.distributed.timeout_s=5",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
        ]
        entry = ["tests/kill_at.py", kill_at] if kill_at else ["-m", "cljax.train"]
        commands = [
            [
                sys.executable,
                *(entry if rank == 0 else ["-m", "cljax.train"]),
                f"--workdir={workdir}",
                *RUN,
                ONE_STEP,
                *flags,
                f"--config.distributed.process_id={rank}",
            ]
            for rank in (0, 1)
        ]
        output = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
        with started(*commands, cwd=REPO, env=env, **output) as processes:
            statuses = [process.wait(timeout=600) for process in processes]
            if kill_at is None:
                assert statuses == [0, 0], processes[0].stderr.read()[-3000:]
            else:
                assert statuses[0] == -signal.SIGKILL and statuses[1] != 0

    for kill_at in kill_points(seed=2):
        both(kill_at)
    both(None)
    assert metrics(workdir)["num_devices"] == 4
    assert_same_results(workdir, reference["device"])


@pytest.mark.slow
def test_sigterm_saves_and_exits_75_and_the_rerun_ends_identically(tmp_path, env, reference):
    workdir, log = tmp_path / "run", tmp_path / "out.log"
    command = [sys.executable, "-m", "cljax.train", f"--workdir={workdir}", *RUN, ONE_STEP]
    with (
        open(log, "w") as out,
        started(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.PIPE, text=True) as (
            process,
        ),
    ):
        wait_for_line(log, "task 1/5: accuracy")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    assert process.returncode == errors.EXIT_PREEMPTED == 75
    assert stderr.strip().splitlines()[-1].startswith("cljax: SIGTERM: saved a checkpoint at task")
    assert metrics(workdir)["status"] == "preempted"
    train(workdir, env=env)
    assert_same_results(workdir, reference["device"])


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, env) -> str:
    """A four-device run killed in task 2, with checkpoints 30 and 36 (end of task 1)."""
    workdir = tmp_path_factory.mktemp("interrupted") / "run"
    train(workdir, kill_at="step:45", env=env)
    return str(workdir)


def copy_of(workdir: str, destination) -> str:
    subprocess.run(["cp", "-r", workdir, str(destination)], check=True)
    return str(destination)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 8])
def test_a_run_resumes_on_another_number_of_devices(tmp_path, env, interrupted, devices):
    workdir = copy_of(interrupted, tmp_path / "run")
    result = train(workdir, f"--config.num_cpu_devices={devices}", env=env)
    assert f"(saved on 4 devices, now {devices})" in result.stdout
    ran = metrics(workdir)
    assert ran["status"] == "finished" and ran["num_devices"] == devices
    assert ran["resumes"] == 1 and len(ran["accuracy_matrix"]) == 5


def buffer_of(fills: list[list[int]], budget: int, seed: int = 0) -> BufferState:
    """A global buffer of len(fills) devices: device d holds fills[d][c] samples of class c,
    each sample's input a unique number (class * 1000 + running index)."""
    devices, classes = len(fills), len(fills[0])
    inputs = np.zeros((devices, classes, budget, 2), np.int32)
    task_ids = np.full((devices, classes, budget), -1, np.int32)
    number = 0
    for device in range(devices):
        for label in range(classes):
            for slot in range(fills[device][label]):
                inputs[device, label, slot] = (label * 1000 + number, device)
                task_ids[device, label, slot] = label // 2
                number += 1
    labels = np.broadcast_to(np.arange(classes, dtype=np.int32)[None, :, None], task_ids.shape)

    def rows(array):
        return array.reshape(devices * classes, *array.shape[2:])

    counts = np.asarray(fills, np.int32)
    return BufferState(
        {"inputs": rows(inputs)}, rows(labels), rows(task_ids), rows(counts), rows(counts * 3)
    )


def stored(buffer: BufferState, devices: int, budget: int) -> dict[int, list]:
    """Per class, the sorted inputs of its filled slots over all devices (checking that
    every filled slot holds its class and task, and every empty one the empty marker)."""
    classes = buffer.counts.shape[0] // devices
    inputs = buffer.data["inputs"].reshape(devices, classes, budget, 2)
    counts = buffer.counts.reshape(devices, classes)
    task_ids = buffer.task_ids.reshape(devices, classes, budget)
    content = {}
    for label in range(classes):
        found = []
        for device in range(devices):
            filled = counts[device, label]
            assert (inputs[device, label, :filled, 0] // 1000 == label).all()
            assert (task_ids[device, label, :filled] == label // 2).all()
            assert (task_ids[device, label, filled:] == -1).all()
            found.extend(int(value) for value in inputs[device, label, :filled, 0])
        content[label] = sorted(found)
    return content


def test_repartition_keeps_every_sample_when_the_new_buffer_holds_them():
    old = buffer_of([[3, 5, 0], [4, 5, 1], [2, 5, 0], [0, 5, 2]], budget=5)
    new = buffer_lib.repartition(old, 4, 8, 3, new_budget=3, seed=0)
    assert stored(new, 8, 3) == stored(old, 4, 5)
    counts = new.counts.reshape(8, 3)
    assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all()
    seen = new.seen.reshape(8, 3)
    assert (seen.sum(axis=0) == old.seen.reshape(4, 3).sum(axis=0)).all()
    assert (seen >= counts).all()


def test_repartition_keeps_a_uniform_subset_of_each_class_when_it_must_drop():
    """4 devices x 5 slots of class 0 (20 samples) into 2 devices x 3 slots: 6 kept, each
    of the 20 equally likely (chi-square over 2000 seeds)."""
    old = buffer_of([[5], [5], [5], [5]], budget=5)
    every = stored(old, 4, 5)[0]
    hits = dict.fromkeys(every, 0)
    for seed in range(2000):
        kept = stored(buffer_lib.repartition(old, 4, 2, 1, new_budget=3, seed=seed), 2, 3)[0]
        assert len(kept) == 6 and set(kept) <= set(every)
        for value in kept:
            hits[value] += 1
    observed = np.asarray(list(hits.values()))
    expected = 2000 * 6 / 20
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 43.8  # the 0.999 quantile of chi-square with 19 degrees of freedom


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_is_named_and_the_one_before_is_used(
    tmp_path, env, interrupted
):
    workdir = copy_of(interrupted, tmp_path / "run")
    latest = os.path.join(workdir, checkpoint.DIRECTORY, "36")
    for root, _, files in os.walk(os.path.join(latest, "state")):
        for name in files:
            with open(os.path.join(root, name), "w") as file:
                file.write("garbage")
    result = train(workdir, env=env)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("cljax:")]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"cljax: warning: checkpoint {latest} is damaged or cannot be")
    assert f"resuming from {os.path.dirname(latest)}/30" in result.stdout
    assert metrics(workdir)["status"] == "finished"


@pytest.mark.slow
def test_a_changed_config_is_refused_naming_the_field_and_a_neutral_one_resumes(
    tmp_path, env, interrupted
):
    workdir = copy_of(interrupted, tmp_path / "run")
    changed = train(workdir, "--config.optimizer.learning_rate=0.01", env=env, check=False)
    assert changed.returncode == errors.EXIT_BAD_INPUT
    assert changed.stderr.strip().splitlines() == [
        f"cljax: {workdir} holds a run whose config differs in optimizer.learning_rate (0.001"
        " -> 0.01); rerun with its config or pass a new --workdir"
    ]
    resumed = train(workdir, "--config.dataset.prefetch_depth=3", env=env)
    assert "resuming from" in resumed.stdout


def test_changed_fields_ignore_what_does_not_change_results():
    saved = {"seed": 0, "dataset": {"workers": "threads", "name": "digits"}, "buffer": {}}
    current = {"seed": 1, "dataset": {"workers": "processes", "name": "digits"}, "buffer": {}}
    assert checkpoint.changed_fields(saved, current, same_devices=True) == ["seed"]
    saved["buffer"]["budget_per_class"], current["buffer"]["budget_per_class"] = 5, 10
    assert checkpoint.changed_fields(saved, current, same_devices=False) == ["seed"]
    assert checkpoint.changed_fields(saved, current, same_devices=True) == [
        "buffer.budget_per_class",
        "seed",
    ]


@pytest.mark.slow
def test_a_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    """The 25th step reports a NaN loss: the run stops, and its latest checkpoint is the
    one of step 20 (a multiple of every_steps whose loss was checked; the task's end may
    have left another before it)."""
    make_train_step = steps.make_train_step

    def failing_at_step_25(*args):
        step, calls = make_train_step(*args), []

        def wrapped(*step_args):
            state, rehearsal, step_metrics = step(*step_args)
            calls.append(None)
            if len(calls) == 25:
                step_metrics = {**step_metrics, "loss": jnp.float32(jnp.nan)}
            return state, rehearsal, step_metrics

        return wrapped

    monkeypatch.setattr(steps, "make_train_step", failing_at_step_25)
    config = configuration.load_config("default")
    configuration.apply_overrides(
        config,
        {
            "dataset.data_dir": data_dir,
            "epochs_per_task": "2",
            "checkpoint.every_steps": "10",
            "steps_per_dispatch": "1",
        },
    )
    workdir = str(tmp_path / "run")
    with pytest.raises(errors.RunFailed, match="the loss became nan at task "):
        trainer.train_and_evaluate(config, workdir)
    assert metrics(workdir)["status"] == "failed"
    saved = [int(name) for name in os.listdir(os.path.join(workdir, checkpoint.DIRECTORY))]
    assert max(saved) == 20
    state = checkpoint.read(workdir, "state")
    for leaf in jax.tree.leaves(state["params"]):
        assert np.isfinite(leaf).all()


@pytest.mark.slow
def test_init_from_loads_exactly_the_exported_model_and_a_run_uses_it(tmp_path, env, reference):
    exported = os.path.join(reference["device"], checkpoint.MODEL_DIRECTORY)
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.restore(exported)
    zeros = jax.tree.map(np.zeros_like, saved)
    state = steps.TrainState(0, zeros["params"], zeros["model_state"], None, None, None)
    loaded = checkpoint.load_model(reference["device"], state)
    jax.tree.map(np.testing.assert_array_equal, loaded.params, saved["params"])

    workdir = tmp_path / "run"
    train(workdir, f"--config.init_from={reference['device']}", env=env)
    fresh = metrics(reference["device"])["accuracy_matrix"][0]
    assert metrics(workdir)["accuracy_matrix"][0] != fresh
    wrong = train(
        tmp_path / "cnn",
        f"--config.init_from={reference['device']}",
        "--config.model.name=cnn",
        env=env,
        check=False,
    )
    assert wrong.returncode == errors.EXIT_BAD_INPUT
    assert wrong.stderr.strip().splitlines()[-1].startswith(f"cljax: init_from={exported}")


@pytest.mark.slow
def test_a_run_in_blocks_killed_twice_ends_as_an_uninterrupted_one(tmp_path, env, reference):
    """Blocks of 4 steps per call, the process killed after its 7th and then its 20th call
    (each rerun counts its own): the results of single steps, uninterrupted."""
    workdir, blocks = tmp_path / "run", "--config.steps_per_dispatch=4"
    for kill_at in ("step:7", "step:20"):
        train(workdir, blocks, kill_at=kill_at, env=env)
    train(workdir, blocks, env=env)
    assert_same_results(workdir, reference["device"])


def flip_a_byte(path: str) -> None:
    with open(path, "rb") as file:
        data = bytearray(file.read())
    data[len(data) // 2] ^= 0x55
    with open(path, "wb") as file:
        file.write(data)


# One file of each kind in a checkpoint (a pattern below its step's folder), and whether a
# restore reads it: a flipped byte in such a file must make the run fall back to the
# checkpoint before; in another it must change nothing.
CHECKPOINT_FILES = {
    "progress/metadata": True,  # the progress document (cljax keeps its SHA-256 in it)
    "state/d/*": True,  # the arrays (TensorStore's OCDBT checks them)
    "rehearsal/d/*": True,
    "state/manifest.ocdbt": True,
    "state/_sharding": None,  # shardings come from the run restoring it
    "state/_METADATA": None,  # read; some bytes of it change nothing
    "state/array_metadatas/*": None,
    "_CHECKPOINT_METADATA": None,
    "state/ocdbt.process_0/d/*": None,  # a process's part, merged into state/d at the save
}


@pytest.mark.slow
@pytest.mark.parametrize("pattern", sorted(CHECKPOINT_FILES))
def test_a_flipped_byte_in_any_checkpoint_file_is_caught_and_the_run_ends_identically(
    pattern, tmp_path, env, interrupted, reference
):
    workdir = copy_of(interrupted, tmp_path / "run")
    latest = os.path.join(workdir, checkpoint.DIRECTORY, "36")
    (target,) = glob.glob(os.path.join(latest, pattern))[:1]
    flip_a_byte(target)
    result = train(workdir, env=env)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("cljax:")]
    fell_back = f"resuming from {os.path.dirname(latest)}/30" in result.stdout
    if CHECKPOINT_FILES[pattern] or fell_back:
        assert fell_back and len(warnings) == 1, (result.stdout[-2000:], warnings)
        assert warnings[0].startswith(f"cljax: warning: checkpoint {latest} is damaged")
    else:
        assert f"resuming from {latest}" in result.stdout and not warnings
    assert_same_results(workdir, reference["device"])


def snapshot(folder: str) -> dict[str, bytes]:
    """Every file under `folder` and its bytes."""
    return {
        os.path.relpath(os.path.join(root, name), folder): open(
            os.path.join(root, name), "rb"
        ).read()
        for root, _, names in os.walk(folder)
        for name in names
    }


@pytest.mark.slow
def test_a_refused_resume_leaves_the_workdir_byte_for_byte_as_it_was(tmp_path, env, interrupted):
    workdir = copy_of(interrupted, tmp_path / "run")
    before = snapshot(workdir)
    refused = train(workdir, "--config.seed=1", env=env, check=False)
    assert refused.returncode == errors.EXIT_BAD_INPUT
    assert snapshot(workdir) == before


def test_a_workdir_without_checkpoints_traces_no_states_to_restore_into(tmp_path, runtime):
    """A fresh run has nothing to restore: the abstract states (a trace of the model's
    initialisation) are not built."""
    checkpoints = checkpoint.Checkpoints(str(tmp_path), runtime, keep=1)
    try:
        built = checkpoints.restore_latest(lambda: pytest.fail("abstract states built"), print)
    finally:
        checkpoints.close()
    assert built is None


def test_fingerprints_are_the_same_summed_on_the_host_or_on_the_devices(runtime, monkeypatch):
    """Small arrays are summed on the host, large ones on the devices: either way, and
    however an array is split or replicated over the devices, one fingerprint per array,
    which a changed element changes."""
    rng = np.random.default_rng(0)
    arrays = {
        "weights": (rng.normal(size=(16, 3)).astype(np.float32), runtime.sharded),
        "inputs": (rng.integers(0, 255, (8, 5)).astype(np.uint8), runtime.sharded),
        "mask": (rng.integers(0, 2, 24).astype(bool), runtime.sharded),
        "step": (np.int32(7), runtime.replicated),
        "bias": (rng.normal(size=3).astype(np.float32), runtime.replicated),
    }
    tree = {name: jax.device_put(value, where) for name, (value, where) in arrays.items()}
    tree["rng"] = jax.device_put(jax.random.key(3), runtime.replicated)
    on_host = fingerprint.fingerprints(tree, lambda partial: partial)
    monkeypatch.setattr(fingerprint, "HOST_SUM_BYTES", -1)
    on_devices = fingerprint.fingerprints(tree, lambda partial: partial)
    assert on_host == on_devices
    numpy_arrays = {name: value for name, (value, _) in arrays.items()}
    assert fingerprint.of_numpy(numpy_arrays) == {k: v for k, v in on_host.items() if k != "rng"}
    numpy_arrays["inputs"][3, 1] ^= 1
    assert fingerprint.of_numpy(numpy_arrays)["inputs"] != on_host["inputs"]
