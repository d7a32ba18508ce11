"""The fused, jitted train step and the sharded prediction step.

One call of the train step, per device: computes the strategy's loss from one forward pass
over [local batch ‖ representatives drawn during the previous step], sums gradients across
devices, inserts candidates from the local batch into the local buffer, then draws the next
step's representatives from the global buffer. The buffer work does not depend on the
gradients, so XLA is free to overlap it with them. Train state and rehearsal state are
donated: the buffer is updated in place.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from cljax.buffer import MASK, TASK_ID, BufferState, RehearsalBuffer, Representatives
from cljax.collectives import AXIS
from cljax.runtime import Runtime
from cljax.strategies import StepOutputs, Strategy, Totals


@flax.struct.dataclass
class TrainState:
    """Everything a step changes, replicated: parameters, the model's other variables
    (e.g. BatchNorm statistics), optimizer and strategy state, and the PRNG key that drives
    every random choice of a step."""

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


@flax.struct.dataclass
class RehearsalState:
    """The buffer and the representatives it drew for the next step, split over devices."""

    buffer: BufferState
    representatives: Representatives


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the train step is built from."""

    model: nn.Module
    optimizer: optax.GradientTransformation
    strategy: Strategy
    max_value: float
    buffer: RehearsalBuffer | None = None
    augment_from_task: int = 0


def step_keys(rng: jax.Array, device_index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Three independent keys from the state's key: the next state's, this device's own
    (its index folded into a parent that serves nothing else), and one shared by all
    devices (the buffer's shared shift)."""
    next_rng, device_parent, shared_key = jax.random.split(rng, 3)
    return next_rng, jax.random.fold_in(device_parent, device_index), shared_key


def normalise(inputs: jax.Array, max_value: float) -> jax.Array:
    """Stored inputs (e.g. uint8) to float32 in [0, 1]."""
    return inputs.astype(jnp.float32) / max_value


def create_train_state(settings: StepConfig, sample_input: jax.Array, key: jax.Array) -> TrainState:
    """Fresh parameters, optimizer state and strategy state."""
    init_key, rng = jax.random.split(key)
    variables = settings.model.init(init_key, sample_input)
    model_state = {name: value for name, value in variables.items() if name != "params"}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        model_state=model_state,
        opt_state=settings.optimizer.init(variables["params"]),
        strategy_state=settings.strategy.init_state(variables),
        rng=rng,
    )


def make_train_step(
    runtime: Runtime, settings: StepConfig
) -> Callable[[TrainState, RehearsalState | None, dict, jax.Array], tuple]:
    """Builds `step(state, rehearsal, batch, task_id) -> (state, rehearsal, metrics)`.

    `rehearsal` is None for strategies without a buffer. `metrics` holds the global loss and
    each of its terms.
    """
    collectives, strategy, buffer = runtime.collectives, settings.strategy, settings.buffer

    def per_device(state: TrainState, rehearsal: RehearsalState | None, batch, task_id):
        rng, device_key, shared_key = step_keys(state.rng, collectives.device_index())
        weights = batch[MASK].astype(jnp.float32)
        inputs, reps, rep_weight = batch["inputs"], None, jnp.float32(0)
        if rehearsal is not None:
            reps = rehearsal.representatives
            reps = dataclasses.replace(
                reps, weights=reps.weights * (task_id >= settings.augment_from_task)
            )
            inputs = jnp.concatenate([inputs, reps.data["inputs"]])
            rep_weight = reps.weights.sum()
        totals = Totals(*collectives.sum((weights.sum(), rep_weight)))
        num_new = weights.shape[0]
        model_inputs = normalise(inputs, settings.max_value)

        def evaluate(variables, x):
            return settings.model.apply(variables, x)

        def loss_fn(params):
            variables = {**state.variables, "params": params}
            logits = settings.model.apply(variables, model_inputs, train=True)
            outputs = StepOutputs(
                logits=logits[:num_new],
                labels=batch["labels"],
                weights=weights,
                rep_logits=logits[num_new:],
                reps=reps,
                totals=totals,
                inputs=model_inputs,
                apply=evaluate,
                collectives=collectives,
            )
            loss, terms = strategy.loss(outputs, state.strategy_state)
            return loss, (terms, strategy.fields_to_store(outputs))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (terms, stored)), grads = grad_fn(collectives.per_device(state.params))
        grads, loss, terms = collectives.sum((grads, loss, terms))
        updates, opt_state = settings.optimizer.update(grads, state.opt_state, state.params)
        state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            rng=rng,
        )
        if rehearsal is not None:
            candidates = {**batch, TASK_ID: task_id, **stored}
            rehearsal = _rehearse(
                buffer, rehearsal, candidates, device_key, shared_key, collectives
            )
        return state, rehearsal, {"loss": loss, **terms}

    specs = (P(), P(AXIS), P(AXIS), P())
    step = runtime.per_device(per_device, specs, (P(), P(AXIS), P()))
    out_shardings = None
    if buffer is not None and buffer.on_host:
        rehearsal_shardings = RehearsalState(buffer.shardings(runtime.sharded), runtime.sharded)
        out_shardings = (runtime.replicated, rehearsal_shardings, None)
    return jax.jit(step, donate_argnums=(0, 1), keep_unused=True, out_shardings=out_shardings)


def _rehearse(
    buffer: RehearsalBuffer,
    rehearsal: RehearsalState,
    candidates: dict[str, jax.Array],
    device_key: jax.Array,
    shared_key: jax.Array,
    collectives,
) -> RehearsalState:
    """Inserts this step's candidates, then draws the next step's representatives.

    Drawing from the buffer as updated lets XLA update it in place: drawing from the old
    buffer while overwriting it would force a copy of the whole buffer every step.
    """
    insert_key, sample_key = jax.random.split(device_key)
    state = buffer.insert(rehearsal.buffer, candidates, insert_key)
    return RehearsalState(state, buffer.sample(state, sample_key, shared_key, collectives))


def make_predict(runtime: Runtime, model: nn.Module, max_value: float, top_k: int):
    """Builds `predict(state, inputs) -> (predicted class [B], top_k classes [B, top_k])`,
    sharded over the batch."""

    def per_device(state: TrainState, inputs):
        logits = model.apply(state.variables, normalise(inputs, max_value))
        return logits.argmax(-1), jax.lax.top_k(logits, top_k)[1]

    return jax.jit(runtime.per_device(per_device, (P(), P(AXIS)), P(AXIS)))
