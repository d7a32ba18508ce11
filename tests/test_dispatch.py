"""K training steps per dispatch: the same values bit for bit as K single steps, in the step,
in the feed and in whole runs; how K is chosen; what still happens between blocks."""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import checkpoint, configuration, preemption, steps, strategies, trainer
from cljax.data import pipeline, prefetch
from cljax.run import dispatch
from tests.test_steps import LR, host_batch, make_settings, make_setup


def single_steps(train_step, state, rehearsal, runtime, batches):
    metrics = []
    for batch in batches:
        state, rehearsal, step_metrics = train_step(
            state, rehearsal, runtime.place(batch), jnp.int32(0), jnp.float32(LR)
        )
        metrics.append(jax.device_get(step_metrics))
    return state, rehearsal, metrics


@pytest.mark.parametrize(
    "strategy", [strategies.ER(), strategies.DERpp(draws=2)], ids=["er", "derpp-2-draws"]
)
def test_a_block_of_k_steps_equals_k_single_steps_bit_for_bit(runtime, strategy):
    """8 devices, 11 steps as blocks of 4, 4 and 3 (the last one's 4th step skipped)."""
    _, state, rehearsal, train_step = make_setup(runtime, strategy=strategy)
    settings = make_settings(strategy=strategy)[1]
    block = steps.make_train_steps(runtime, settings, 4)
    batches = [host_batch(step, runtime.num_devices) for step in range(11)]
    copies = jax.tree.map(jnp.copy, (state, rehearsal))
    state, rehearsal, expected = single_steps(train_step, state, rehearsal, runtime, batches)
    blocked_state, blocked_rehearsal, metrics = (*copies, [])
    for first in range(0, 11, 4):
        chunk = batches[first : first + 4]
        count = len(chunk)
        chunk += chunk[-1:] * (4 - count)
        stacked = {name: np.stack([b[name] for b in chunk]) for name in chunk[0]}
        blocked_state, blocked_rehearsal, block_metrics = block(
            blocked_state,
            blocked_rehearsal,
            runtime.place(stacked, steps=True),
            jnp.int32(0),
            jnp.full(4, LR, jnp.float32),
            jnp.int32(count),
        )
        values = jax.device_get(block_metrics)
        metrics += [{name: value[i] for name, value in values.items()} for i in range(count)]
        assert all((value[count:] == 0).all() for value in values.values())
    assert_same(state, blocked_state)
    assert_same(rehearsal, blocked_rehearsal)
    assert_same(expected, metrics)


class CountedER(strategies.ER):
    """ER that counts how many times its loss is traced."""

    traces: ClassVar[list[int]] = []

    def loss(self, outputs, state):
        self.traces.append(1)
        return super().loss(outputs, state)


def test_a_block_program_traces_the_step_once(runtime):
    """The steps skipped past `count` take the metrics' shapes from the one trace of the
    step, not from tracing it again (which would double a large model's tracing time)."""
    strategy = CountedER()
    _, state, rehearsal, _ = make_setup(runtime, strategy=strategy)
    block = steps.make_train_steps(runtime, make_settings(strategy=strategy)[1], 4)
    batches = [host_batch(step, runtime.num_devices) for step in range(4)]
    stacked = {name: np.stack([b[name] for b in batches]) for name in batches[0]}
    CountedER.traces.clear()
    block.trace(
        state,
        rehearsal,
        runtime.place(stacked, steps=True),
        jnp.int32(0),
        jnp.full(4, LR, jnp.float32),
        jnp.int32(4),
    )
    assert len(CountedER.traces) == 1


def assert_same(a, b) -> None:
    def same(x, y):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    jax.tree.map(same, a, b)


def test_k_is_the_power_of_two_that_makes_a_block_last_about_50_ms():
    assert dispatch.choose_length(0.1) == dispatch.choose_length(0.05) == 1
    assert dispatch.choose_length(0.025) == 2
    assert dispatch.choose_length(0.0012) == 32  # 41.7 is nearer 32 than 64
    assert dispatch.choose_length(0.0007) == 64
    assert dispatch.choose_length(1e-6) == dispatch.MAX_STEPS


class HostOnly:
    """What a Dispatcher needs of a runtime, on the host: the values as they are."""

    def place(self, batch: dict, steps: bool = False) -> dict:
        return batch

    def replicate(self, value):
        return value

    def broadcast_text(self, text: str) -> str:
        return text


@pytest.mark.parametrize(
    ("length", "single", "single_calls"),
    [(None, False, dispatch.CALIBRATION_STEPS), (8, False, 0), (1, False, 13), (8, True, 13)],
)
def test_single_calls_only_while_k_is_chosen_or_when_it_is_1_or_asked(
    monkeypatch, length, single, single_calls
):
    """Once K > 1 is known, a one-step call runs the block program too (a run with
    steps_per_dispatch set never traces the one-step program), unless a single call is
    asked for (the profiled steps)."""
    calls = []

    def program(kind):
        return lambda state, rehearsal, *args: calls.append(kind) or (state, rehearsal, {})

    machinery = type("Steps", (), {"train_step": staticmethod(program("single"))})()
    dispatcher = dispatch.Dispatcher(machinery, HostOnly(), lambda line: None, length)
    monkeypatch.setattr(dispatcher, "_block_program", lambda: program("block"))
    for _ in range(13):
        dispatcher.run(None, None, {"inputs": np.zeros((1, 2))}, 0, np.ones(1), single)
    assert calls.count("single") == single_calls
    assert calls.count("block") == 13 - single_calls


def test_items_of_many_steps_hold_the_same_batches_as_one_step_items(digits):
    task_rows = (np.arange(100), np.arange(100, 150))
    layout = pipeline.Layout(global_batch_size=8, local_devices=2)
    loader = pipeline.Loader(
        digits.train, digits.test, task_rows, layout, pipeline.Views(), (8, 8, 1), 3, 8
    )
    start = pipeline.Position(0, 1, 5)
    one = pipeline.plan(task_rows, 0, 3, 8, 8, start)
    many = pipeline.plan(task_rows, 0, 3, 8, 8, start, steps_per_item=16)
    assert [i.steps for i in many] == [16, 5, 16, 5]  # 21 steps left of each task: never across
    assert sum(i.steps for i in many) == len(one)
    reader = prefetch.TrainSteps(iter([loader(item) for item in many]))
    for size in (1, 5, 16, 12, 6, 2):  # across items, whole items, parts of items
        taken, skipped = reader.take(size)
        expected = [loader(item) for item in one[:size]]
        del one[:size]
        assert skipped == []
        for name in ("inputs", "labels", "mask"):
            np.testing.assert_array_equal(taken[name], np.stack([e[name] for e in expected]))
    assert not one and not reader.holding


def test_in_memory_data_fills_items_of_up_to_4_mib(digits):
    views = pipeline.Views()
    assert pipeline.steps_per_item(digits.train, views, 7840) == 256
    assert pipeline.steps_per_item(digits.train, views, 100_000) == 32
    assert pipeline.steps_per_item(digits.train, views, 8 << 20) == 1
    resized = pipeline.Views(image_size=16)
    assert pipeline.steps_per_item(digits.train, resized, 7840) == 1


class TwoProcesses:
    """A runtime of two processes whose agreements are recorded."""

    process_count = 2

    def __init__(self):
        self.agreed_at: list[int] = []
        self.step = 0

    def max_over_processes(self, values):
        self.agreed_at.append(self.step)
        return values


@pytest.mark.parametrize(
    ("ends", "agreements"),
    [
        (range(1, 35), [10, 20, 30]),  # one step per check: at multiples of 10
        (range(4, 70, 8), [12, 20, 36, 44, 52, 60]),  # blocks of 8: 28 and 68 pass no multiple
        (range(37, 60, 1), [40, 50]),  # resumed mid-way
    ],
)
def test_processes_agree_on_preemption_at_the_first_check_past_every_10_steps(ends, agreements):
    runtime = TwoProcesses()
    preempt = preemption.Preemption(runtime)
    for step in ends:
        runtime.step = step
        assert preempt.requested(step) is False
    assert runtime.agreed_at == agreements


def run(data_dir: str, workdir, **fields) -> dict:
    config = configuration.load_config("default:derpp")
    config.dataset.data_dir = data_dir
    config.scenario.num_tasks, config.epochs_per_task = 2, 2
    config.checkpoint.every_steps = 30
    config.logging.every_steps = 7
    for name, value in fields.items():
        config[name] = value
    return trainer.train_and_evaluate(config, str(workdir))


@pytest.mark.slow
def test_a_run_in_blocks_ends_as_the_run_of_single_steps(data_dir, tmp_path):
    """Blocks of 16, cut at checkpoint steps, end in the matrices, buffer, train state and
    logged scalars of single steps; so does the chosen K."""
    single = run(data_dir, tmp_path / "single", steps_per_dispatch=1)
    for name, length in (("blocks", 16), ("chosen", None)):
        blocked = run(data_dir, tmp_path / name, steps_per_dispatch=length)
        assert blocked["accuracy_matrix"] == single["accuracy_matrix"]
        for item in ("state", "rehearsal"):
            assert_same(
                checkpoint.read(tmp_path / name, item), checkpoint.read(tmp_path / "single", item)
            )
        assert scalars(tmp_path / name) == scalars(tmp_path / "single")


def scalars(workdir) -> dict:
    from tests.helpers import tensorboard_scalars

    return {
        tag: [point for point in points]
        for tag, points in tensorboard_scalars(workdir).items()
        if tag.startswith("train/")
    }
