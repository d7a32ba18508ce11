"""The fused, jitted train step and the sharded prediction step.

One call of the train step, per device: augments [local batch ‖ representatives drawn
during the previous step] on the device, computes the strategy's loss from one forward pass
over them (BatchNorm statistics over every device's rows), sums gradients across devices,
updates the parameters with the learning rate the host passed, inserts candidates from the
local batch into the local buffer, then draws the next step's representatives from the
global buffer. The buffer work does not depend on the gradients, so XLA is free to overlap
it with them. Train state and rehearsal state are donated: the buffer is updated in place.

A batch holds `inputs`, `labels` and `mask` (False: padding), and, where the input pipeline
augments new samples itself (`inception`), `candidate_rows` (the c rows of each device's
batch it offers the buffer) and `candidate_inputs` (their un-augmented views, stored instead).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from cljax import augment, optim
from cljax.buffer import LABELS, MASK, RehearsalBuffer, RehearsalState, Representatives
from cljax.buffer.candidates import step_candidates
from cljax.collectives import AXIS
from cljax.runtime import Runtime
from cljax.strategies import StepOutputs, Strategy, TaskRows, Totals


@flax.struct.dataclass
class TrainState:
    """Everything a step changes, replicated: parameters, the model's other variables
    (BatchNorm statistics), optimizer and strategy state, and the PRNG key that drives every
    random choice of a step."""

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    strategy_state: Any
    rng: jax.Array

    @property
    def variables(self) -> dict:
        """The model's variables, as `model.apply` takes them."""
        return {"params": self.params, **self.model_state}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the train and prediction steps are built from.

    `max_value`, `mean` and `std` normalise the stored inputs (per channel); `dtype` is the
    model's computation dtype; `augmentation` is one of `augment.MODES` (resolved: not
    `auto`). `class_tasks` gives each class's task, for strategies that read it
    (`Strategy.needs_task_classes`). `average_model_state` averages the model's other
    variables over devices every step, with the gradients: set it where the model computes
    its BatchNorm statistics per device, so that the running statistics stay replicated.
    """

    model: nn.Module
    optimizer: optax.GradientTransformation
    strategy: Strategy
    max_value: float
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    dtype: Any = jnp.float32
    augmentation: str = "none"
    label_smoothing: float = 0.0
    buffer: RehearsalBuffer | None = None
    augment_from_task: int = 0
    average_model_state: bool = False
    class_tasks: tuple[int, ...] | None = None

    def normalise(self, inputs: jax.Array) -> jax.Array:
        return augment.normalise(
            inputs, self.max_value, jnp.asarray(self.mean), jnp.asarray(self.std), self.dtype
        )


DEVICE_KEYS = ("insert", "sample", "augment", "dropout")


def step_keys(
    rng: jax.Array, device_index: jax.Array, num_devices: int
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """Independent keys from the state's key: the next state's, this device's own (one per
    use in `DEVICE_KEYS`), and one shared by all devices (the buffer's shared shift).

    All come from one split of the state's key, which holds every device's own keys
    (`len(DEVICE_KEYS)` x `num_devices` of them): each `jax.random` call is a loop of its
    own on XLA:CPU, and one call for all of them costs no more than one for a few.
    """
    keys = jax.random.split(rng, 2 + len(DEVICE_KEYS) * num_devices)
    per_device = keys[2:].reshape(num_devices, len(DEVICE_KEYS))[device_index]
    return keys[0], dict(zip(DEVICE_KEYS, per_device, strict=True)), keys[1]


def create_train_state(settings: StepConfig, sample_input: jax.Array, key: jax.Array) -> TrainState:
    """Fresh parameters (from `key`), optimizer state and strategy state."""
    init_key, rng = jax.random.split(key)
    variables = settings.model.init(init_key, settings.normalise(sample_input))
    model_state = {name: value for name, value in variables.items() if name != "params"}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        model_state=model_state,
        opt_state=settings.optimizer.init(variables["params"]),
        strategy_state=settings.strategy.init_state(variables),
        rng=rng,
    )


def make_train_step(runtime: Runtime, settings: StepConfig) -> Callable[..., tuple]:
    """Builds `step(state, rehearsal, batch, task_id, learning_rate) -> (state, rehearsal,
    metrics)`.

    `rehearsal` is None for strategies without a buffer. `metrics` holds the global loss,
    each of its terms, and the weight of the representatives used.
    """
    per_device = _per_device_step(runtime.collectives, settings)
    step = runtime.per_device(per_device, (P(), P(AXIS), P(AXIS), P(), P()), (P(), P(AXIS), P()))
    return _jitted(step, runtime, settings)


def make_train_steps(runtime: Runtime, settings: StepConfig, length: int) -> Callable[..., tuple]:
    """Builds `steps(state, rehearsal, batches, task_id, learning_rates, count) -> (state,
    rehearsal, metrics)`: the first `count` (<= `length`) of `length` train steps in one
    dispatch, a `lax.scan` of the train step over the leading axis of `batches` and
    `learning_rates`; each metric holds one value per step (zeros past `count`).

    The steps past `count` are skipped (a `lax.cond`), so one compiled program serves every
    block of up to `length` steps. The steps draw the same keys from the state as that many
    single calls and compute the same values bit for bit (tested): where a step's own work is
    small, this removes the host's share of all steps of a block but one.
    """
    per_device = _per_device_step(runtime.collectives, settings)

    def block(state, rehearsal, batches, task_id, learning_rates, count):
        traced: dict[str, Any] = {}  # the metrics' shapes, once `run` has been traced

        def one_step(carry, inputs):
            batch, learning_rate, index = inputs

            def run(carry):
                state, rehearsal, metrics = per_device(*carry, batch, task_id, learning_rate)
                traced["metrics"] = jax.tree.map(
                    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metrics
                )
                return (state, rehearsal), metrics

            def skip(carry):
                # `cond` traces `run` first (JAX 0.10): its shapes spare tracing the step twice
                metrics = traced.get("metrics") or jax.eval_shape(run, carry)[1]
                return carry, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics)

            return jax.lax.cond(index < count, run, skip, carry)

        inputs = (batches, learning_rates, jnp.arange(length))
        (state, rehearsal), metrics = jax.lax.scan(one_step, (state, rehearsal), inputs)
        return state, rehearsal, metrics

    specs = (P(), P(AXIS), P(None, AXIS), P(), P(), P())
    return _jitted(runtime.per_device(block, specs, (P(), P(AXIS), P())), runtime, settings)


def _jitted(step: Callable, runtime: Runtime, settings: StepConfig) -> Callable:
    """`step` jitted with the train and rehearsal states donated, the buffer's slots kept in
    their memory kind."""
    out_shardings = None
    buffer = settings.buffer
    if buffer is not None and buffer.on_host:
        out_shardings = (runtime.replicated, buffer.rehearsal_shardings(runtime.sharded), None)
    return runtime.jit(step, donate_argnums=(0, 1), keep_unused=True, out_shardings=out_shardings)


def _per_device_step(collectives, settings: StepConfig) -> Callable:
    """One device's part of a training step (see the module docstring)."""
    strategy, buffer = settings.strategy, settings.buffer
    class_tasks = None if settings.class_tasks is None else np.asarray(settings.class_tasks)

    def per_device(state: TrainState, rehearsal, batch, task_id, learning_rate):
        rng, keys, shared_key = step_keys(
            state.rng, collectives.device_index(), collectives.num_devices()
        )
        weights = batch[MASK].astype(jnp.float32)
        reps, replayed, rep_weight = None, None, jnp.float32(0)
        if rehearsal is not None:
            reps = rehearsal.representatives
            reps = dataclasses.replace(
                reps, weights=reps.weights * (task_id >= settings.augment_from_task)
            )
            replayed = reps.data["inputs"]
            rep_weight = reps.weights.sum()
        totals = Totals(*collectives.sum((weights.sum(), rep_weight)))
        num_new = weights.shape[0]
        rows = augment.augment(settings.augmentation, batch["inputs"], replayed, keys["augment"])
        model_inputs = settings.normalise(rows)
        in_statistics = jnp.concatenate([weights, _rep_weight_rows(reps)]) > 0

        def evaluate(variables, x):
            return settings.model.apply(variables, x)

        def loss_fn(params):
            logits, model_state = settings.model.apply(
                {**state.variables, "params": params},
                model_inputs,
                train=True,
                mask=in_statistics,
                rngs={"dropout": keys["dropout"]},
                mutable=list(state.model_state),
            )
            logits = logits.astype(jnp.float32)
            outputs = StepOutputs(
                logits=logits[:num_new],
                labels=batch[LABELS],
                weights=weights,
                rep_logits=logits[num_new:],
                reps=reps,
                totals=totals,
                inputs=model_inputs,
                apply=evaluate,
                collectives=collectives,
                task_id=task_id,
                params=params,
                class_tasks=None if class_tasks is None else jnp.asarray(class_tasks),
                label_smoothing=settings.label_smoothing,
            )
            loss, terms = strategy.loss(outputs, state.strategy_state)
            return loss, (terms, model_state, strategy.fields_to_store(outputs))

        params = collectives.per_device(state.params)
        if strategy.gradient_terms:
            (loss, (terms, model_state, stored)), grads = term_gradients(
                loss_fn, params, strategy.gradient_terms
            )
        else:
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, (terms, model_state, stored)), grads = grad_fn(params)
        varying_state = model_state if settings.average_model_state else None
        grads, loss, terms, state_sum = collectives.sum((grads, loss, terms, varying_state))
        if strategy.gradient_terms:
            grads = strategy.combine_gradients(grads)
        if settings.average_model_state:
            model_state = jax.tree.map(lambda total: total / collectives.num_devices(), state_sum)
        opt_state = optim.with_learning_rate(state.opt_state, learning_rate)
        updates, opt_state = settings.optimizer.update(grads, opt_state, state.params)
        state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            model_state=model_state,
            opt_state=opt_state,
            rng=rng,
        )
        if rehearsal is not None:
            # Insert, then draw from the buffer as updated: drawing from the old buffer while
            # overwriting it would make XLA copy the whole buffer every step.
            # Named scopes label the buffer's ops in profiles (benchmarks/overhead.py).
            with jax.named_scope("buffer_insert"):
                candidates = step_candidates(batch, task_id, stored)
                buffer_state = buffer.insert(rehearsal.buffer, candidates, keys["insert"])
            with jax.named_scope("buffer_sample"):
                representatives = buffer.sample(
                    buffer_state, keys["sample"], shared_key, collectives
                )
            rehearsal = RehearsalState(buffer_state, representatives)
        return state, rehearsal, {"loss": loss, **terms, "rep_weight": totals.reps}

    return per_device


def term_gradients(loss_fn: Callable, params, names: tuple[str, ...]) -> tuple:
    """`loss_fn(params) -> (loss, (terms, ...))`'s value and, for each term in `names`, its
    gradient: one forward pass, one backward pass per term."""

    def named_terms(params):
        loss, aux = loss_fn(params)
        return jnp.stack([aux[0][name] for name in names]), (loss, aux)

    values, backward, value = jax.vjp(named_terms, params, has_aux=True)
    # Each term's cotangent is built from `values`, so it has their type (per device).
    basis = [jnp.zeros_like(values).at[index].set(1.0) for index in range(len(names))]
    return value, {name: backward(row)[0] for name, row in zip(names, basis, strict=True)}


def _rep_weight_rows(reps: Representatives | None) -> jax.Array:
    """The representatives' weights, or no rows at all without a buffer."""
    return jnp.zeros(0, jnp.float32) if reps is None else reps.weights


def make_task_pass(runtime: Runtime, settings: StepConfig) -> tuple[Callable, Callable]:
    """Builds the end-of-task pass of a strategy with `needs_task_pass`:
    `batch_sums(state, inputs, labels, valid) -> (sums, count)`, its `task_pass_sums` over
    one batch of the task's rows, summed over devices, and `finish(state, sums, count) ->
    state`, the state with the strategy's `end_task` state (the train state is donated).
    The model runs in evaluation mode."""
    strategy = settings.strategy

    def per_device(state: TrainState, inputs, labels, valid):
        weights = valid.astype(jnp.float32)
        # This device's own copy: a gradient of the replicated one would be summed over devices.
        params = runtime.collectives.per_device(state.params)
        sums = strategy.task_pass_sums(
            state.strategy_state,
            {**state.variables, "params": params},
            settings.model.apply,
            settings.normalise(inputs),
            labels,
            weights,
        )
        return runtime.collectives.sum((sums, weights.sum()))

    batch_sums = runtime.per_device(per_device, (P(), P(AXIS), P(AXIS), P(AXIS)), P())

    def finish(state: TrainState, sums, count) -> TrainState:
        strategy_state = strategy.end_task(state.strategy_state, state.variables, sums, count)
        return state.replace(strategy_state=strategy_state)

    return runtime.jit(batch_sums), runtime.jit(finish, donate_argnums=0)


def make_task_rows_end(runtime: Runtime, settings: StepConfig) -> Callable:
    """Builds, for a strategy with `collects_task_rows`, `end(state, rehearsal, inputs,
    labels, valid, task_id) -> (state, rehearsal)`: its `end_task_with_rows` on every device,
    given its rows of every batch of the end-of-task pass (lists, one array per batch). Both
    states are donated."""
    strategy = settings.strategy

    def per_device(state: TrainState, rehearsal, inputs, labels, valid, task_id):
        context = TaskRows(
            inputs=jnp.concatenate(inputs),
            labels=jnp.concatenate(labels),
            valid=jnp.concatenate(valid),
            buffer=rehearsal.buffer,
            task_id=task_id,
            class_tasks=settings.class_tasks,
            apply=settings.model.apply,
            normalise=settings.normalise,
            collectives=runtime.collectives,
        )
        strategy_state, buffer = strategy.end_task_with_rows(
            state.strategy_state, state.variables, context
        )
        rehearsal = dataclasses.replace(rehearsal, buffer=buffer)
        return state.replace(strategy_state=strategy_state), rehearsal

    specs = (P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P())
    return runtime.jit(runtime.per_device(per_device, specs, (P(), P(AXIS))), donate_argnums=(0, 1))


def make_predict(runtime: Runtime, settings: StepConfig, top_k: int, class_tasks=None):
    """Builds `predict(state, inputs) -> (predicted class [B], top_k classes [B, top_k],
    per-task predictions [B, T])`, sharded over the batch; BatchNorm uses its running
    averages.

    `class_tasks` [C] gives each class's task (scenarios whose tasks share no class); column
    t of the per-task predictions is then the best class among task t's (task-IL: the logits
    masked to the task's classes). Without it, T = 0.
    """

    def per_device(state: TrainState, inputs):
        logits = settings.strategy.evaluation_logits(
            state.strategy_state, state.variables, settings.model.apply, settings.normalise(inputs)
        )
        logits = logits.astype(jnp.float32)
        per_task = jnp.zeros((logits.shape[0], 0), jnp.int32)
        if class_tasks is not None:
            tasks = np.arange(int(np.max(class_tasks)) + 1)
            in_task = jnp.asarray(np.asarray(class_tasks)[None, :] == tasks[:, None])  # [T, C]
            per_task = jnp.where(in_task, logits[:, None, :], -jnp.inf).argmax(-1)
        return logits.argmax(-1), jax.lax.top_k(logits, top_k)[1], per_task

    return runtime.jit(runtime.per_device(per_device, (P(), P(AXIS)), P(AXIS)))
