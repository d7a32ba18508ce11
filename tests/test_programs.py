"""Programs kept on disk (`cljax.programs`) and the descriptions that key them
(`cljax.describe`): a program is read back only where everything that builds it is the same,
and a program read back computes what the plain program computes, bit for bit."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import augment, describe, programs, strategies, trainer
from cljax import runtime as runtime_lib
from cljax.models.mlp import MLP
from tests.test_steps import LR, host_batch, make_setup
from tests.test_training import digits_config

STEPS = 4


def test_a_description_changes_with_every_value_that_builds_the_program():
    """Closures, dataclass fields and arrays all count; equal values built apart agree."""
    assert describe.describe(optax.sgd(0.1)) == describe.describe(optax.sgd(0.1))
    assert describe.describe(optax.sgd(0.1)) != describe.describe(optax.sgd(0.2))
    wide, narrow = MLP(num_classes=4, hidden_sizes=(16,)), MLP(num_classes=4, hidden_sizes=(8,))
    assert describe.describe(wide) != describe.describe(narrow)
    assert describe.describe(strategies.DER(alpha=0.2)) != describe.describe(
        strategies.DER(alpha=0.3)
    )
    assert describe.describe(np.arange(3)) != describe.describe(np.arange(3) + 1)


@dataclasses.dataclass(frozen=True)
class _Outside:
    scale: float


def test_what_comes_from_outside_cljax_and_its_libraries_is_never_described():
    """Code defined elsewhere (here, a test module) could change unseen."""
    for value in (lambda x: x, _Outside(1.0), optax.scale_by_schedule(lambda step: step)):
        with pytest.raises(describe.Undescribable):
            describe.describe(value)


def test_a_patched_cljax_function_changes_the_loaded_code(monkeypatch):
    before = describe.loaded_cljax()
    monkeypatch.setattr(augment, "normalise", lambda *args: args[0])
    assert describe.loaded_cljax() != before
    monkeypatch.undo()
    assert describe.loaded_cljax() == before


def test_a_code_digest_does_not_depend_on_references_to_its_constants():
    """`marshal`'s bytes do (they mark constants referenced more than once): programs
    were missed after a run had touched a function's constants."""

    def function(text):
        return text + "a constant of this function"

    before = describe.code_digest(function)
    describe._code_digest.cache_clear()
    held = list(function.__code__.co_consts) * 3
    assert describe.code_digest(function) == before, held


def test_the_loaded_code_reads_the_same_in_every_process():
    """Nothing in it depends on where objects lie in memory (an object's id, say) or on
    the process's string hashing: a second run must find the first run's programs."""
    script = (
        "import os; padding = bytearray(int(os.environ['PADDING']));"
        " import cljax.trainer, cljax.plots, cljax.report;"
        " from cljax import describe; print(describe.loaded_cljax())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PADDING": padding, "PYTHONHASHSEED": padding},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for padding in ("1", "1000003")
    }
    assert len(digests) == 1


def _run(runtime, directory, strategy=strategies.ER()):  # noqa: B008 (frozen)
    """`STEPS` train steps through programs kept in `directory`; the final states on the
    host, and the run's `Programs`."""
    runtime.programs = programs.Programs(str(directory), runtime.mesh)
    _, state, rehearsal, train_step = make_setup(runtime, strategy=strategy)
    for step in range(STEPS):
        batch = runtime.place(host_batch(step, runtime.num_devices))
        state, rehearsal, _ = train_step(state, rehearsal, batch, jnp.int32(0), jnp.float32(LR))
    return jax.device_get((state.params, jax.random.key_data(state.rng), rehearsal)), (
        runtime.programs
    )


@pytest.fixture
def fresh_runtime(monkeypatch):
    """A runtime of its own, where programs are kept (`_run` keeps them in a folder of the
    test's); the rest of the suite keeps none (conftest.py)."""
    monkeypatch.delenv(programs.SWITCH)
    return runtime_lib.JaxRuntime(600)


def test_a_program_read_back_computes_what_the_plain_program_does(fresh_runtime, tmp_path):
    exported_states, first = _run(fresh_runtime, tmp_path)
    read_states, second = _run(fresh_runtime, tmp_path)
    fresh_runtime.programs = None
    _, state, rehearsal, plain_step = make_setup(fresh_runtime)
    for step in range(STEPS):
        batch = fresh_runtime.place(host_batch(step, fresh_runtime.num_devices))
        state, rehearsal, _ = plain_step(state, rehearsal, batch, jnp.int32(0), jnp.float32(LR))
    plain_states = jax.device_get((state.params, jax.random.key_data(state.rng), rehearsal))
    assert (first.exported, first.read, second.exported, second.read) == (1, 0, 0, 1)
    assert len(list(tmp_path.glob(f"*{programs.SUFFIX}"))) == 1
    jax.tree.map(np.testing.assert_array_equal, exported_states, plain_states)
    jax.tree.map(np.testing.assert_array_equal, read_states, plain_states)


def test_a_changed_hyperparameter_builds_its_own_program(fresh_runtime, tmp_path):
    weak, first = _run(fresh_runtime, tmp_path, strategies.DER(alpha=0.1))
    strong, second = _run(fresh_runtime, tmp_path, strategies.DER(alpha=10.0))
    assert (first.exported, second.exported, second.read) == (1, 1, 0)
    assert not np.array_equal(weak[0]["Dense_0"]["kernel"], strong[0]["Dense_0"]["kernel"])


def test_a_damaged_program_is_exported_again(fresh_runtime, tmp_path):
    states, _ = _run(fresh_runtime, tmp_path)
    (path,) = tmp_path.glob(f"*{programs.SUFFIX}")
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    again, programs_again = _run(fresh_runtime, tmp_path)
    assert (programs_again.exported, programs_again.read) == (1, 0)
    jax.tree.map(np.testing.assert_array_equal, again, states)
    _, programs_read = _run(fresh_runtime, tmp_path)
    assert programs_read.read == 1


def test_programs_are_kept_where_jax_keeps_compiled_programs_unless_switched_off(
    fresh_runtime, monkeypatch
):
    assert isinstance(fresh_runtime.programs, programs.Programs)
    enabled = jax.config.jax_enable_compilation_cache
    try:
        jax.config.update("jax_enable_compilation_cache", False)
        assert runtime_lib.JaxRuntime(600).programs is None
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
    monkeypatch.setenv(programs.SWITCH, "0")
    assert runtime_lib.JaxRuntime(600).programs is None


@pytest.mark.slow
def test_a_run_from_kept_programs_gives_the_same_results(data_dir, tmp_path, monkeypatch):
    """Three runs of DER++: without kept programs, exporting them, reading them back."""
    monkeypatch.setenv("CLJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(programs.SWITCH)
    config = digits_config(data_dir, "derpp")
    config.steps_per_dispatch = 4  # every run, the same programs
    enabled = jax.config.jax_enable_compilation_cache
    try:
        jax.config.update("jax_enable_compilation_cache", False)
        plain = trainer.train_and_evaluate(config, str(tmp_path / "plain"))
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
    first = trainer.train_and_evaluate(config, str(tmp_path / "first"))
    folder = tmp_path / "cache" / runtime_lib.PROGRAMS_FOLDER
    kept = {path: path.stat().st_mtime_ns for path in folder.glob(f"*{programs.SUFFIX}")}
    second = trainer.train_and_evaluate(config, str(tmp_path / "second"))
    again = {path: path.stat().st_mtime_ns for path in folder.glob(f"*{programs.SUFFIX}")}
    assert len(kept) >= 3 and again == kept  # the block, the initial state, the predictions
    for name in ("accuracy_matrix", "task_il_accuracy_matrix", "final_average_accuracy"):
        assert plain[name] == first[name] == second[name], name
