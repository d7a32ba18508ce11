"""The fused train step: exact data-parallel gradients, staleness 1, and donation."""

import dataclasses
import re
from collections.abc import Callable
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import buffer as buffer_lib
from cljax import runtime as runtime_lib
from cljax import steps, strategies
from cljax.collectives import JaxCollectives, SingleDevice
from cljax.models.mlp import MLP

NUM_CLASSES, BUDGET, BATCH, CANDIDATES, REPS = 4, 3, 4, 2, 8
LR = 0.1  # the learning rate every step below is given, unless it says otherwise
MAX_VALUE = 1000.0
EXAMPLE = {"inputs": jax.ShapeDtypeStruct((3,), np.dtype(np.int32))}


def make_setup(
    runtime,
    budget: int = BUDGET,
    augment_from_task: int = 0,
    memory_kind: str = "device",
    strategy: strategies.Strategy = strategies.ER(),  # noqa: B008 (frozen)
    class_tasks: tuple[int, ...] | None = None,
):
    """Model, replicated train state, sharded rehearsal state and the jitted step."""
    model, settings = make_settings(budget, augment_from_task, memory_kind, strategy, class_tasks)
    example = {**EXAMPLE, **strategy.stored_fields(NUM_CLASSES)}
    buffer = settings.buffer
    state = steps.create_train_state(settings, jnp.zeros((1, 3)), jax.random.key(0))
    state = jax.device_put(state, runtime.replicated)
    rehearsal = buffer_lib.RehearsalState(
        buffer.init_sharded(example, runtime.sharded),
        buffer.empty_representatives_sharded(example, runtime.sharded),
    )
    return model, state, rehearsal, steps.make_train_step(runtime, settings)


def make_settings(
    budget: int = BUDGET,
    augment_from_task: int = 0,
    memory_kind: str = "device",
    strategy: strategies.Strategy = strategies.ER(),  # noqa: B008 (frozen)
    class_tasks: tuple[int, ...] | None = None,
) -> tuple:
    """The model and what the steps are built from."""
    model = MLP(num_classes=NUM_CLASSES, hidden_sizes=(16,))
    buffer = buffer_lib.rehearsal_buffer(
        NUM_CLASSES,
        budget,
        CANDIDATES,
        REPS,
        memory_kind=memory_kind,
        draws=strategy.buffer_draws,
    )
    settings = steps.StepConfig(
        model=model,
        optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=LR),
        strategy=strategy,
        max_value=MAX_VALUE,
        buffer=buffer,
        augment_from_task=augment_from_task,
        class_tasks=class_tasks,
    )
    return model, settings


def host_batch(step: int, num_devices: int) -> dict[str, np.ndarray]:
    """Samples [id, label, 0] with ids unique to the step; the last row is masked out."""
    size = BATCH * num_devices
    ids = np.arange(size) + step * size
    labels = (ids * 7) % NUM_CLASSES
    mask = np.ones(size, bool)
    mask[-1] = False
    inputs = np.stack([ids, labels, np.zeros_like(ids)], -1).astype(np.int32)
    return {"inputs": inputs, "labels": labels.astype(np.int32), "mask": mask}


def run_steps(train_step, state, rehearsal, num_devices: int, steps: int, lr: float = LR):
    """`steps` train steps of task 0 on `host_batch(0..steps-1)`."""
    for step in range(steps):
        batch = host_batch(step, num_devices)
        state, rehearsal, _ = train_step(state, rehearsal, batch, jnp.int32(0), lr)
    return state, rehearsal


def assert_gradient_step(new_params, params, loss_fn: Callable, learning_rate: float = LR):
    """`new_params` are `params` after one plain SGD step on `loss_fn` (single device)."""
    grads = jax.grad(loss_fn)(params)
    expected = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
        jax.device_get(new_params),
        expected,
    )


def test_step_equals_single_device_gradient_step_on_global_batch(runtime):
    model, state, rehearsal, train_step = make_setup(runtime)
    state, rehearsal = run_steps(train_step, state, rehearsal, runtime.num_devices, 3)
    reps = jax.device_get(rehearsal.representatives)
    params = jax.device_get(state.params)
    batch = host_batch(3, runtime.num_devices)
    inputs = np.concatenate([batch["inputs"], reps.data["inputs"].reshape(-1, 3)])
    labels = np.concatenate([batch["labels"], reps.labels.ravel()])
    weights = np.concatenate([batch["mask"].astype(np.float32), reps.weights.ravel()])
    assert reps.weights.sum() > 0

    def global_loss(params):
        logits = model.apply({"params": params}, inputs / MAX_VALUE)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return (ce * weights).sum() / weights.sum()

    state, _, metrics = train_step(state, rehearsal, batch, jnp.int32(0), LR)
    assert_gradient_step(state.params, params, global_loss)
    np.testing.assert_allclose(metrics["loss"], global_loss(params), rtol=1e-5)


def test_representatives_used_with_a_batch_never_include_that_batch(runtime):
    _, state, rehearsal, train_step = make_setup(runtime)
    for step in range(12):
        batch = host_batch(step, runtime.num_devices)
        used = jax.device_get(rehearsal.representatives)
        used_ids = used.data["inputs"][..., 0][used.weights > 0]
        assert not set(used_ids.tolist()) & set(batch["inputs"][:, 0].tolist())
        if step >= 1:
            assert used_ids.size > 0 and used_ids.max() < step * len(batch["mask"])
        state, rehearsal, _ = train_step(state, rehearsal, batch, jnp.int32(0), LR)


def test_train_and_rehearsal_state_are_donated(runtime):
    _, state, rehearsal, train_step = make_setup(runtime)
    old_leaves = jax.tree.leaves((state.params, rehearsal))
    train_step(state, rehearsal, host_batch(0, runtime.num_devices), jnp.int32(0), LR)
    assert all(leaf.is_deleted() for leaf in old_leaves)


@pytest.mark.parametrize("seed", [0, 1])
def test_same_seed_gives_bit_identical_states(runtime, seed):
    def run():
        _, state, rehearsal, train_step = make_setup(runtime)
        state = state.replace(rng=jax.device_put(jax.random.key(seed), state.rng.sharding))
        state, rehearsal = run_steps(train_step, state, rehearsal, runtime.num_devices, 5)
        return jax.device_get((state.params, rehearsal))

    first, second = run(), run()
    jax.tree.map(np.testing.assert_array_equal, first, second)


class ShardMapOnOneDevice(runtime_lib.JaxRuntime):
    """A mesh of one device run as a larger one is: `shard_map` and `jax.lax` collectives."""

    def __init__(self):
        super().__init__(600, jax.devices()[:1])
        self.collectives = JaxCollectives()


def test_one_device_step_has_no_collectives_and_the_same_states_bit_for_bit():
    compiled, states = [], []
    for runtime in (runtime_lib.JaxRuntime(600, jax.devices()[:1]), ShardMapOnOneDevice()):
        _, state, rehearsal, train_step = make_setup(runtime)
        lowered = train_step.lower(state, rehearsal, host_batch(0, 1), jnp.int32(0), LR)
        compiled.append(lowered.compile().as_text())
        state, rehearsal = run_steps(train_step, state, rehearsal, 1, 6)
        states.append(jax.device_get((state.params, jax.random.key_data(state.rng), rehearsal)))
    assert "all-reduce" not in compiled[0] and "all-reduce" in compiled[1]
    jax.tree.map(np.testing.assert_array_equal, *states)


def test_compiled_step_updates_the_buffer_without_copying_it(runtime):
    """No copy in the compiled step is as large as any per-slot field of the buffer."""
    budget = 5000
    _, state, rehearsal, train_step = make_setup(runtime, budget=budget)
    batch = host_batch(0, runtime.num_devices)
    hlo = train_step.lower(state, rehearsal, batch, jnp.int32(0), LR).compile().as_text()
    buffer_elements = NUM_CLASSES * budget
    copies = [line for line in hlo.splitlines() if " copy(" in line]
    sizes = [
        int(np.prod([int(d) for d in shape.split(",") if d] or [1]))
        for line in copies
        for shape in re.findall(r"\[([\d,]*)\]", line.split("=")[1].split("copy(")[0])
    ]
    assert copies, "expected the compiled step to hold some small copies"
    assert max(sizes) < buffer_elements


def test_representatives_are_ignored_before_augment_from_task(runtime):
    model, state, rehearsal, train_step = make_setup(runtime, augment_from_task=1)
    state, rehearsal = run_steps(train_step, state, rehearsal, runtime.num_devices, 3)
    assert rehearsal.representatives.weights.sum() > 0
    params = jax.device_get(state.params)
    batch = host_batch(3, runtime.num_devices)
    _, _, metrics = train_step(state, rehearsal, batch, jnp.int32(0), LR)
    logits = model.apply({"params": params}, batch["inputs"] / MAX_VALUE)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    expected = (ce * batch["mask"]).sum() / batch["mask"].sum()
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)


def test_buffer_in_pinned_host_memory_stays_there_and_changes_nothing_else(runtime):
    def run(memory_kind: str):
        _, state, rehearsal, train_step = make_setup(runtime, memory_kind=memory_kind)
        for step in range(6):
            old = rehearsal.buffer.data["inputs"]
            state, rehearsal, _ = train_step(
                state, rehearsal, host_batch(step, runtime.num_devices), jnp.int32(0), LR
            )
            assert old.is_deleted()
        return state.params, rehearsal

    on_device, on_host = run("device"), run("pinned_host")
    buffer = on_host[1].buffer
    assert {leaf.sharding.memory_kind for leaf in (buffer.data["inputs"], buffer.labels)} == {
        "pinned_host"
    }
    assert on_host[1].representatives.weights.sharding.memory_kind == "device"
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(on_device), jax.device_get(on_host))


def test_step_keys_are_distinct_and_only_the_device_keys_differ_between_devices():
    rng = jax.random.key(3)
    keys = [steps.step_keys(rng, jnp.int32(device), 4) for device in range(4)]
    data = [jax.tree.map(lambda key: bytes(np.asarray(jax.random.key_data(key))), k) for k in keys]
    for next_rng, _, shared in data[1:]:
        assert next_rng == data[0][0] and shared == data[0][2]
    own = [key for _, device_keys, _ in data for key in device_keys.values()]
    assert len(own) == 4 * len(steps.DEVICE_KEYS)
    assert len({*own, data[0][0], data[0][2]}) == len(own) + 2


class AgreementCheckingCollectives(JaxCollectives):
    """Records whether every device passed the same shift to `receive_shifted`."""

    def __init__(self, record: list):
        super().__init__()
        self.record = record

    def receive_shifted(self, tree, shift):
        agreed = jax.lax.pmax(shift, self.axis_name) == jax.lax.pmin(shift, self.axis_name)
        jax.debug.callback(lambda ok: self.record.append(bool(ok)), agreed)
        return super().receive_shifted(tree, jax.lax.pmin(shift, self.axis_name))


def test_every_device_draws_the_same_shared_shift_in_the_step():
    record = []
    runtime = runtime_lib.JaxRuntime(timeout_s=600)
    runtime.collectives = AgreementCheckingCollectives(record)
    _, state, rehearsal, train_step = make_setup(runtime)
    state, rehearsal = run_steps(train_step, state, rehearsal, runtime.num_devices, 3)
    jax.block_until_ready(rehearsal)
    assert len(record) == 3 * runtime.num_devices and all(record)


def filled_rows(rehearsal) -> dict[str, np.ndarray]:
    """Every filled slot of the global buffer, as rows."""
    buffer = jax.device_get(rehearsal.buffer)
    filled = np.asarray(buffer.counts)[:, None] > np.arange(buffer.labels.shape[1])
    return {name: np.asarray(value)[filled] for name, value in buffer.data.items()}


def test_der_stores_each_sample_with_the_logits_of_its_forward_pass():
    model, state, rehearsal, train_step = make_setup(runtime_lib.JaxRuntime(600), strategy=DER)
    params = jax.device_get(state.params)
    batch = host_batch(0, 8)
    rows = filled_rows(train_step(state, rehearsal, batch, jnp.int32(0), LR)[1])
    assert len(rows["inputs"]) > 0
    expected = model.apply({"params": params}, rows["inputs"] / MAX_VALUE)
    np.testing.assert_allclose(rows["logits"], expected, rtol=1e-5, atol=1e-6)
    assert np.abs(rows["logits"]).max() > 1e-3


DER = strategies.DER(alpha=0.3)
DERPP = strategies.DERpp(alpha=0.3, beta=0.7)


@pytest.mark.parametrize("strategy", [DER, DERPP], ids=["der", "derpp"])
def test_der_and_derpp_losses_equal_their_definitions(runtime, strategy):
    """CE(batch) + alpha MSE(f(x_buf), z_buf) [+ beta CE(f(x_buf), y_buf)], weighted."""
    model, state, rehearsal, train_step = make_setup(runtime, strategy=strategy)
    state, rehearsal = run_steps(train_step, state, rehearsal, runtime.num_devices, 6, lr=3.0)
    reps = jax.device_get(rehearsal.representatives)
    params = jax.device_get(state.params)
    batch = host_batch(6, runtime.num_devices)
    _, _, metrics = train_step(state, rehearsal, batch, jnp.int32(0), LR)

    def logits(inputs):
        return model.apply({"params": params}, np.asarray(inputs).reshape(-1, 3) / MAX_VALUE)

    mask = batch["mask"].astype(np.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits(batch["inputs"]), batch["labels"])
    new_ce = (ce * mask).sum() / mask.sum()
    rep_logits = logits(reps.data["inputs"])
    weights = reps.weights.ravel()
    squared = ((rep_logits - reps.data["logits"].reshape(rep_logits.shape)) ** 2).mean(-1)
    mse = (squared * weights).sum() / weights.sum()
    replay = optax.softmax_cross_entropy_with_integer_labels(rep_logits, reps.labels.ravel())
    replay_ce = (replay * weights).sum() / weights.sum()
    expected = new_ce + strategy.alpha * mse
    if isinstance(strategy, strategies.DERpp):
        expected += strategy.beta * replay_ce
        np.testing.assert_allclose(metrics["replay_ce"], replay_ce, rtol=1e-5)
    # The logit term is 100x the tolerance below: zeroing it fails the test.
    assert weights.sum() > 0 and strategy.alpha * mse > 1e-3 * expected
    np.testing.assert_allclose(metrics["logit_mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(metrics["new_ce"], new_ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)


CLASS_TASKS = (0, 0, 1, 1)


def task_batch(step: int, num_devices: int, task: int) -> dict[str, np.ndarray]:
    """`host_batch(step)` with labels of `task`'s two classes only (`CLASS_TASKS`)."""
    batch = host_batch(step, num_devices)
    return {**batch, "labels": (2 * task + batch["labels"] % 2).astype(np.int32)}


@pytest.mark.parametrize("task", [0, 1])
def test_er_ace_loss_masks_new_rows_to_the_task_and_replay_to_seen_classes(runtime, task):
    """CE(batch, current task's classes) + CE(representatives, classes seen so far), each a
    mean over its rows of all devices. The buffer holds task 0's classes; at task 0 the replay
    term leaves out the unseen classes, at task 1 the new term leaves out the old ones."""
    model, state, rehearsal, train_step = make_setup(
        runtime, strategy=strategies.ERACE(), class_tasks=CLASS_TASKS
    )
    for step in range(6):
        batch = task_batch(step, runtime.num_devices, 0)
        state, rehearsal, _ = train_step(state, rehearsal, batch, jnp.int32(0), 3.0)
    reps = jax.device_get(rehearsal.representatives)
    params = jax.device_get(state.params)
    batch = task_batch(6, runtime.num_devices, task)
    _, _, metrics = train_step(state, rehearsal, batch, jnp.int32(task), LR)

    def mean_ce(inputs, labels, weights, classes):
        logits = model.apply({"params": params}, np.asarray(inputs).reshape(-1, 3) / MAX_VALUE)
        logits = np.where(classes, logits, -1e9)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels.ravel())
        return (ce * weights).sum() / weights.sum()

    class_tasks = np.asarray(CLASS_TASKS)
    mask, weights = batch["mask"].astype(np.float32), reps.weights.ravel()
    rep_rows = (reps.data["inputs"], reps.labels, weights)
    new_ce = mean_ce(batch["inputs"], batch["labels"], mask, class_tasks == task)
    replay_ce = mean_ce(*rep_rows, class_tasks <= task)
    unmasked = mean_ce(batch["inputs"], batch["labels"], mask, True) + mean_ce(*rep_rows, True)
    assert weights.sum() > 0 and abs(unmasked - (new_ce + replay_ce)) > 1e-2 * unmasked
    np.testing.assert_allclose(metrics["new_ce"], new_ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["replay_ce"], replay_ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], new_ce + replay_ce, rtol=1e-5)


@pytest.mark.parametrize(("warm_up_lr", "projects"), [(0.1, True), (3.0, False)])
def test_agem_projects_the_global_gradient_where_it_would_raise_the_old_tasks_loss(
    runtime, warm_up_lr, projects
):
    """At task 1, the update is -lr (g - (g.g_ref / g_ref.g_ref) g_ref) where g.g_ref < 0,
    else -lr g, with g the new rows' gradient and g_ref the task-0 representatives', both of
    the global batch (8 devices). The warm-up's learning rate makes g.g_ref < 0 or > 0."""
    model, state, rehearsal, train_step = make_setup(runtime, strategy=strategies.AGEM())
    for step in range(6):
        batch = task_batch(step, runtime.num_devices, 0)
        state, rehearsal, metrics = train_step(state, rehearsal, batch, jnp.int32(0), warm_up_lr)
        assert float(metrics["reference_ce"]) == 0.0  # task 0 has no earlier task to protect
    reps = jax.device_get(rehearsal.representatives)
    params = jax.device_get(state.params)
    batch = task_batch(6, runtime.num_devices, 1)
    state, _, metrics = train_step(state, rehearsal, batch, jnp.int32(1), LR)

    def mean_ce(params, inputs, labels, weights):
        logits = model.apply({"params": params}, np.asarray(inputs).reshape(-1, 3) / MAX_VALUE)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels.ravel())
        return (ce * weights).sum() / weights.sum()

    weights = reps.weights.ravel() * (reps.task_ids.ravel() < 1)
    new = jax.grad(mean_ce)(params, batch["inputs"], batch["labels"], batch["mask"] * 1.0)
    reference = jax.grad(mean_ce)(params, reps.data["inputs"], reps.labels, weights)
    dot = strategies.tree_dot(new, reference)
    assert weights.sum() > 0 and (dot < 0) == projects
    scale = min(dot, 0.0) / strategies.tree_dot(reference, reference)
    expected = jax.tree.map(lambda p, g, r: p - LR * (g - scale * r), params, new, reference)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
        jax.device_get(state.params),
        expected,
    )
    np.testing.assert_allclose(
        metrics["loss"],
        mean_ce(params, batch["inputs"], batch["labels"], batch["mask"] * 1.0),
        rtol=1e-5,
    )


def test_lwf_loss_is_cross_entropy_over_seen_classes_plus_distillation_of_old_ones(runtime):
    """At task 1: CE(batch, classes of tasks 0-1) + alpha T-softmax cross-entropy from the
    teacher (the model when the task began) to the model, over task 0's classes."""
    lwf = strategies.LwF(alpha=0.7, temperature=2.0)
    model, state, _, train_step = make_setup(runtime, strategy=lwf, class_tasks=CLASS_TASKS)
    first = task_batch(0, runtime.num_devices, 0)
    seen_logits = model.apply({"params": jax.device_get(state.params)}, first["inputs"] / MAX_VALUE)
    first_ce = optax.softmax_cross_entropy_with_integer_labels(seen_logits[:, :2], first["labels"])
    for step in range(4):
        batch = task_batch(step, runtime.num_devices, 0)
        state, _, metrics = train_step(state, None, batch, jnp.int32(0), 3.0)
        if step == 0:  # task 0's classes only, and no old classes to distil
            weights = first["mask"].astype(np.float32)
            np.testing.assert_allclose(
                metrics["new_ce"], (first_ce * weights).sum() / weights.sum(), rtol=1e-5
            )
            assert float(metrics["distillation"]) == 0.0
    teacher = jax.device_get(state.params)
    state = state.replace(strategy_state=lwf.begin_task(state.strategy_state, state.variables, 1))
    state, _, _ = train_step(state, None, task_batch(4, runtime.num_devices, 1), jnp.int32(1), 3.0)
    params = jax.device_get(state.params)
    batch = task_batch(5, runtime.num_devices, 1)
    _, _, metrics = train_step(state, None, batch, jnp.int32(1), LR)

    def logits(variables):
        return model.apply({"params": variables}, batch["inputs"] / MAX_VALUE)

    mask = batch["mask"].astype(np.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits(params), batch["labels"])
    new_ce = (ce * mask).sum() / mask.sum()
    old = slice(0, 2)  # task 0's classes
    soft = optax.softmax_cross_entropy(
        logits(params)[:, old] / 2.0, jax.nn.softmax(logits(teacher)[:, old] / 2.0)
    )
    distillation = (soft * mask).sum() / mask.sum()
    assert 0.7 * distillation > 1e-2 * new_ce  # zeroing the term fails the test
    np.testing.assert_allclose(metrics["new_ce"], new_ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["distillation"], distillation, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], new_ce + 0.7 * distillation, rtol=1e-5)


@dataclasses.dataclass(frozen=True)
class OffsetLoss(strategies.Strategy):
    """Fine-tuning plus a constant kept in the strategy's own state."""

    name: ClassVar[str] = "offset"

    def init_state(self, variables):
        return jnp.float32(2.5)

    def loss(self, outputs, state):
        loss, terms = super().loss(outputs, state)
        return loss + state, {**terms, "offset": state}


def test_a_strategys_own_state_reaches_its_loss_through_the_step(runtime):
    model, state, _, train_step = make_setup(runtime, strategy=OffsetLoss())
    params = jax.device_get(state.params)
    batch = host_batch(0, runtime.num_devices)
    state, _, metrics = train_step(state, None, batch, jnp.int32(0), LR)
    logits = model.apply({"params": params}, batch["inputs"] / MAX_VALUE)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    expected = (ce * batch["mask"]).sum() / batch["mask"].sum()
    # Each device adds the replicated offset to its part of the loss: D times in the sum.
    np.testing.assert_allclose(metrics["loss"], expected + 2.5 * runtime.num_devices, rtol=1e-5)
    assert float(state.strategy_state) == 2.5


class Echo(nn.Module):
    """Logits that are the inputs themselves (times a parameter that starts at 1)."""

    @nn.compact
    def __call__(self, x, *, train: bool = False, mask=None):
        return self.param("scale", nn.initializers.ones, ()) * x.reshape(x.shape[0], -1)


def test_task_il_prediction_is_the_best_class_of_each_task(runtime):
    """Top-1 over every class, and per task the best of that task's classes (the logits
    masked to them): what task-IL accuracy counts."""
    settings = steps.StepConfig(
        model=Echo(), optimizer=optax.sgd(0.1), strategy=strategies.ER(), max_value=1.0
    )
    state = steps.create_train_state(settings, jnp.zeros((1, 4)), jax.random.key(0))
    predict = steps.make_predict(runtime, settings, 2, class_tasks=np.asarray([0, 0, 1, 1]))
    logits = np.zeros((runtime.num_devices, 4), np.float32)
    logits[:3] = [[0, 1, 5, 0], [3, 2, 0, 4], [0, 0, 1, 2]]
    best, top2, per_task = (np.asarray(x) for x in predict(state, runtime.place(logits)))
    np.testing.assert_array_equal(best[:3], [2, 3, 3])
    np.testing.assert_array_equal(top2[:3], [[2, 1], [3, 0], [3, 2]])
    np.testing.assert_array_equal(per_task[:3], [[1, 2], [0, 3], [0, 3]])
    no_tasks = steps.make_predict(runtime, settings, 2)
    assert np.asarray(no_tasks(state, runtime.place(logits))[2]).shape == (len(logits), 0)


def test_online_ewc_step_descends_cross_entropy_plus_the_fisher_weighted_penalty(runtime):
    """With F and theta* in the strategy's state: one step on 8 devices is the single-device
    gradient step on CE(global batch) + lambda sum F (theta - theta*)^2."""
    ewc = strategies.OnlineEWC(penalty_weight=40.0)
    model, state, _, train_step = make_setup(runtime, strategy=ewc)
    params = jax.device_get(state.params)
    keys = iter(jax.random.split(jax.random.key(1), 8))
    fisher = jax.device_get(jax.tree.map(lambda p: jax.random.uniform(next(keys), p.shape), params))
    anchor = jax.device_get(
        jax.tree.map(lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape), params)
    )
    state = state.replace(
        strategy_state=jax.device_put({"fisher": fisher, "anchor": anchor}, runtime.replicated)
    )
    batch = host_batch(0, runtime.num_devices)

    def penalty(params):
        terms = jax.tree.map(lambda f, p, a: (f * (p - a) ** 2).sum(), fisher, params, anchor)
        return sum(jax.tree.leaves(terms))

    def global_loss(params):
        logits = model.apply({"params": params}, batch["inputs"] / MAX_VALUE)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        return (ce * batch["mask"]).sum() / batch["mask"].sum() + 40.0 * penalty(params)

    state, _, metrics = train_step(state, None, batch, jnp.int32(1), LR)
    assert 40.0 * penalty(params) > 0.1 * float(metrics["new_ce"])  # a zero penalty fails
    np.testing.assert_allclose(metrics["penalty"], penalty(params), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], global_loss(params), rtol=1e-5)
    assert_gradient_step(state.params, params, global_loss)


def test_online_ewc_task_pass_gives_the_mean_of_each_rows_weighted_squared_gradient(runtime):
    """The end-of-task pass on 8 devices, over two batches with padding: F_task = mean over
    the real rows of p(y|x) (d log p(y|x))^2, each row's gradient on its own;
    F = gamma F_old + F_task, and theta* the parameters as the task ended."""
    ewc = strategies.OnlineEWC(gamma=0.5)
    model, settings = make_settings(strategy=ewc)
    state = steps.create_train_state(settings, jnp.zeros((1, 3)), jax.random.key(0))
    old_fisher = jax.tree.map(lambda p: np.full(p.shape, 0.25, np.float32), state.params)
    state = jax.device_put(
        state.replace(strategy_state={**state.strategy_state, "fisher": old_fisher}),
        runtime.replicated,
    )
    params = jax.device_get(state.params)
    batch_sums, finish = steps.make_task_pass(runtime, settings)
    batches = [host_batch(step, runtime.num_devices) for step in range(2)]
    totals = None
    for batch in batches:
        placed = runtime.place({**batch, "valid": batch["mask"]})
        sums = batch_sums(state, placed["inputs"], placed["labels"], placed["valid"])
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    state = finish(state, *totals)

    def row_fisher(inputs, label):
        def log_likelihood(params):
            logits = model.apply({"params": params}, inputs[None] / MAX_VALUE)[0]
            return jax.nn.log_softmax(logits)[label]

        grad = jax.grad(log_likelihood)(params)
        return jax.tree.map(lambda g: jnp.exp(log_likelihood(params)) * g**2, grad)

    rows = [
        row_fisher(batch["inputs"][row], batch["labels"][row])
        for batch in batches
        for row in np.flatnonzero(batch["mask"])
    ]
    mean = jax.tree.map(lambda *values: sum(values) / len(values), *rows)
    expected = jax.tree.map(lambda new, old: 0.5 * old + new, mean, old_fisher)
    assert float(totals[1]) == len(rows)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9),
        jax.device_get(state.strategy_state["fisher"]),
        expected,
    )
    jax.tree.map(np.testing.assert_array_equal, state.strategy_state["anchor"], params)


def test_gdumb_learns_nothing_from_new_rows_and_only_the_buffer_without_them(runtime):
    """A step with new rows leaves the parameters as they were (the stream only fills the
    buffer); a step whose rows are all padding is the single-device gradient step on the
    representatives' cross-entropy (the retraining)."""
    gdumb = strategies.GDumb()
    model, state, rehearsal, train_step = make_setup(runtime, strategy=gdumb)
    before = jax.device_get(state.params)
    state, rehearsal = run_steps(train_step, state, rehearsal, runtime.num_devices, 3)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
    reps = jax.device_get(rehearsal.representatives)
    inputs, labels = reps.data["inputs"].reshape(-1, 3), reps.labels.ravel()
    weights = reps.weights.ravel()
    assert weights.sum() > 0

    def replay_loss(params):
        logits = model.apply({"params": params}, inputs / MAX_VALUE)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return (ce * weights).sum() / weights.sum()

    padding = {
        **host_batch(3, runtime.num_devices),
        "mask": np.zeros(BATCH * runtime.num_devices, bool),
    }
    state, _, metrics = train_step(state, rehearsal, padding, jnp.int32(0), LR)
    np.testing.assert_allclose(metrics["loss"], replay_loss(before), rtol=1e-5)
    assert_gradient_step(state.params, before, replay_loss)


def test_icarl_loss_is_bce_on_current_labels_and_the_teachers_sigmoids_on_old_classes(runtime):
    """At task 1, over [batch ‖ representatives]: mean over the seen classes of the binary
    cross-entropy with logits against the one-hot label on task 1's classes and the
    teacher's sigmoids on task 0's, weighted over all devices' rows."""
    icarl = strategies.ICaRL()
    model, state, rehearsal, train_step = make_setup(
        runtime, strategy=icarl, class_tasks=CLASS_TASKS, budget=6
    )
    for step in range(3):  # representatives drawn from an empty buffer weigh nothing
        batch = task_batch(step, runtime.num_devices, 0)
        state, rehearsal, _ = train_step(state, rehearsal, batch, jnp.int32(0), 3.0)
    teacher = jax.device_get(state.params)
    state = state.replace(strategy_state=icarl.begin_task(state.strategy_state, state.variables, 1))
    state, rehearsal, _ = train_step(
        state, rehearsal, task_batch(3, runtime.num_devices, 1), jnp.int32(1), 3.0
    )
    params = jax.device_get(state.params)
    reps = jax.device_get(rehearsal.representatives)
    batch = task_batch(4, runtime.num_devices, 1)
    _, _, metrics = train_step(state, rehearsal, batch, jnp.int32(1), LR)
    inputs = np.concatenate([batch["inputs"], reps.data["inputs"].reshape(-1, 3)])
    labels = np.concatenate([batch["labels"], reps.labels.ravel()])
    weights = np.concatenate([batch["mask"].astype(np.float32), reps.weights.ravel()])
    assert reps.weights.sum() > 0  # this buffer (reservoir) has old classes to replay

    def logits(variables):
        return model.apply({"params": variables}, inputs / MAX_VALUE)

    current = jax.nn.one_hot(labels - 2, 2)  # zero for the replayed rows of task 0
    targets = np.concatenate([jax.nn.sigmoid(logits(teacher)[:, :2]), current], 1)
    bce = optax.sigmoid_binary_cross_entropy(logits(params), targets).mean(-1)
    expected = (bce * weights).sum() / weights.sum()
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    labels_only = optax.sigmoid_binary_cross_entropy(
        logits(params), jax.nn.one_hot(labels, 4)
    ).mean(-1)
    assert abs((labels_only * weights).sum() / weights.sum() - expected) > 1e-3  # teacher counts


def test_herding_picks_the_rows_whose_running_mean_stays_nearest_the_class_mean():
    """iCaRL's herding on 12 rows of one class among others, against a loop over the rows."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(20, 5)).astype(np.float32)
    member = rng.random(20) < 0.6
    mean = features[member].mean(0)
    picked = np.asarray(strategies.icarl.herd(features, member, mean, 4, 7))
    expected, running = [], np.zeros(5, np.float32)
    for step in range(4):
        costs = [
            np.linalg.norm(mean - (features[row] + running) / (step + 1))
            if member[row] and row not in expected
            else np.inf
            for row in range(20)
        ]
        expected.append(int(np.argmin(costs)))
        running += features[expected[-1]]
    assert picked[:4].tolist() == expected and len(set(expected)) == 4


def test_icarl_buffer_keeps_m_exemplars_per_seen_class_the_old_ones_first_in_herding_order(
    runtime,
):
    """One device, 6 slots, tasks of 2 classes: after task 0 each class holds 3 exemplars
    picked by herding among its rows; after task 1 each of 4 classes holds 1 (6 // 4): the
    old classes their first exemplar, the new ones herding's first pick."""
    icarl = strategies.ICaRL()
    model, settings = make_settings(strategy=icarl, class_tasks=CLASS_TASKS)
    state = steps.create_train_state(settings, jnp.zeros((1, 3)), jax.random.key(0))
    buffer = buffer_lib.rehearsal_buffer(4, 6, 2, 2, policy="end_of_task", partition="stream")
    example = {"inputs": jax.ShapeDtypeStruct((3,), np.dtype(np.int32))}
    buffer_state = buffer.init(example)
    variables = state.variables

    def apply(variables, x):
        return model.apply(variables, x)

    def after(task, buffer_state, rows):
        context = strategies.TaskRows(
            inputs=rows["inputs"],
            labels=rows["labels"],
            valid=rows["mask"],
            buffer=buffer_state,
            task_id=jnp.int32(task),
            class_tasks=CLASS_TASKS,
            apply=apply,
            normalise=settings.normalise,
            collectives=SingleDevice(),
        )
        return icarl.end_task_with_rows(state.strategy_state, variables, context)

    rows0 = task_batch(0, 8, 0)
    strategy_state, buffer_state = after(0, buffer_state, rows0)
    labels = np.asarray(buffer_state.labels[0])
    ids = np.asarray(buffer_state.data["inputs"][0][:, 0])
    assert int(buffer_state.counts[0]) == 6 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    features, _ = strategies.icarl.features_and_logits(
        apply, variables, settings.normalise(jnp.asarray(rows0["inputs"]))
    )
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    for label in (0, 1):
        member = (rows0["labels"] == label) & rows0["mask"]
        expected = strategies.icarl.herd(features, member, features[member].mean(0), 3, 3)
        np.testing.assert_array_equal(ids[labels == label], rows0["inputs"][expected, 0])
    rows1 = task_batch(1, 8, 1)
    _, later = after(1, buffer_state, rows1)
    later_ids = np.asarray(later.data["inputs"][0][:4, 0])
    assert int(later.counts[0]) == 4 and np.asarray(later.labels[0][:4]).tolist() == [0, 1, 2, 3]
    assert later_ids[:2].tolist() == [ids[0], ids[3]]  # each old class's first exemplar
    assert set(rows1["labels"][np.searchsorted(rows1["inputs"][:, 0], later_ids[2:])]) == {2, 3}
    np.testing.assert_allclose(strategy_state["has_mean"], [True, True, False, False])


def test_icarl_evaluates_by_the_nearest_class_mean_not_the_classifier(runtime):
    """Predictions rank classes by the distance of the feature (the last Dense layer's
    input) to each seen class's mean; classes without a mean are never predicted."""
    icarl = strategies.ICaRL()
    model, settings = make_settings(strategy=icarl, class_tasks=CLASS_TASKS)
    state = steps.create_train_state(settings, jnp.zeros((1, 3)), jax.random.key(0))
    inputs = host_batch(0, runtime.num_devices)["inputs"]
    features, logits = strategies.icarl.features_and_logits(
        model.apply, state.variables, settings.normalise(jnp.asarray(inputs))
    )
    means = np.asarray(features[:3])  # classes 0-2 have means; class 3 none
    state = state.replace(
        strategy_state={
            **state.strategy_state,
            "class_means": np.concatenate([means, np.zeros_like(means[:1])]),
            "has_mean": np.asarray([True, True, True, False]),
        }
    )
    predict = steps.make_predict(runtime, settings, 2)
    best, _, _ = predict(jax.device_put(state, runtime.replicated), inputs)
    distances = ((np.asarray(features)[:, None] - means[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(best, distances.argmin(1))
    assert (np.asarray(best) != np.asarray(logits).argmax(1)).any()  # not the classifier's
