"""The fused, jitted train step and the sharded prediction step.

One call of the train step, per device and inside `shard_map`: computes the strategy's
loss from one forward pass over [local batch ‖ representatives drawn during the previous
step], sums gradients across devices, inserts candidates from the local batch into the
local buffer, then draws the next step's representatives from the global buffer. The
buffer work does not depend on the gradients, so XLA is free to overlap it with them.
Train state and rehearsal state are donated: the buffer is updated in place.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from cljax import buffer as buffer_lib
from cljax import distributed
from cljax.collectives import Collectives
from cljax.distributed import AXIS
from cljax.strategies import Batch, LossWeights, Strategy, Totals


class TrainState(train_state.TrainState):
    """Flax train state plus the PRNG key that drives every random choice of a step."""

    rng: jax.Array


@flax.struct.dataclass
class RehearsalState:
    """The buffer and the representatives it drew for the next step, per device."""

    buffer: buffer_lib.BufferState
    representatives: buffer_lib.Representatives


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the train step."""

    max_value: float
    strategy: Strategy
    num_candidates: int = 0
    num_representatives: int = 0
    policy: str = "reservoir"
    loss_weights: LossWeights = dataclasses.field(default_factory=LossWeights)
    augment_from_task: int = 0
    buffer_memory_kind: str = "device"

    @property
    def buffer_on_host(self) -> bool:
        return self.buffer_memory_kind == "pinned_host"


def normalise(inputs: jax.Array, max_value: float) -> jax.Array:
    """Stored inputs (e.g. uint8) to float32 in [0, 1]."""
    return inputs.astype(jnp.float32) / max_value


def make_train_step(
    mesh: Mesh, collectives: Collectives, settings: StepConfig
) -> Callable[[TrainState, RehearsalState | None, dict, jax.Array], tuple]:
    """Builds `step(state, rehearsal, batch, task_id) -> (state, rehearsal, metrics)`.

    `rehearsal` is None for strategies without a buffer.
    """

    def per_device(state: TrainState, rehearsal: RehearsalState | None, batch, task_id):
        rng, step_key = jax.random.split(state.rng)
        device_key = jax.random.fold_in(step_key, collectives.device_index())
        weights = batch["mask"].astype(jnp.float32)
        inputs, reps, rep_weight = batch["inputs"], None, jnp.float32(0)
        if rehearsal is not None:
            rehearsal = jax.tree.map(lambda leaf: leaf[0], rehearsal)
            reps = rehearsal.representatives
            reps = reps.replace(weights=reps.weights * (task_id >= settings.augment_from_task))
            inputs = jnp.concatenate([inputs, reps.data["inputs"]])
            rep_weight = reps.weights.sum()
        totals = Totals(*collectives.sum((weights.sum(), rep_weight)))
        num_new = weights.shape[0]

        def loss_fn(params):
            logits = state.apply_fn({"params": params}, normalise(inputs, settings.max_value))
            rows = Batch(logits[:num_new], batch["labels"], weights, logits[num_new:], reps)
            return settings.strategy.loss(rows, totals, settings.loss_weights), logits[:num_new]

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, logits), grads = grad_fn(collectives.per_device(state.params))
        grads, loss = collectives.sum((grads, loss))
        state = state.apply_gradients(grads=grads).replace(rng=rng)
        if rehearsal is not None:
            samples = {**batch, "logits": jax.lax.stop_gradient(logits)}
            rehearsal = _rehearse(
                rehearsal, samples, task_id, device_key, step_key, collectives, settings
            )
            rehearsal = jax.tree.map(lambda leaf: leaf[None], rehearsal)
        return state, rehearsal, {"loss": loss}

    specs = (P(), P(AXIS), P(AXIS), P())
    step = distributed.per_device(per_device, mesh, specs, (P(), P(AXIS), P()))
    out_shardings = None
    if settings.buffer_on_host:
        buffer_sharding = buffer_lib.buffer_shardings(mesh, "pinned_host")
        rehearsal_shardings = RehearsalState(buffer_sharding, distributed.sharded(mesh))
        out_shardings = (distributed.replicated(mesh), rehearsal_shardings, None)
    return jax.jit(step, donate_argnums=(0, 1), keep_unused=True, out_shardings=out_shardings)


def _rehearse(
    rehearsal: RehearsalState,
    samples: dict[str, jax.Array],
    task_id: jax.Array,
    device_key: jax.Array,
    shared_key: jax.Array,
    collectives: Collectives,
    settings: StepConfig,
) -> RehearsalState:
    """Inserts this step's candidates, then draws the next step's representatives.

    Drawing from the buffer as updated lets XLA update it in place: drawing from the old
    buffer while overwriting it would force a copy of the whole buffer every step.
    """
    insert_key, sample_key = jax.random.split(device_key)
    buffer = buffer_lib.insert(
        rehearsal.buffer,
        {name: samples[name] for name in rehearsal.buffer.data},
        samples["labels"],
        samples["mask"],
        task_id,
        insert_key,
        settings.num_candidates,
        settings.policy,
        on_host=settings.buffer_on_host,
    )
    representatives = buffer_lib.sample_global(
        buffer,
        sample_key,
        shared_key,
        settings.num_representatives,
        collectives,
        on_host=settings.buffer_on_host,
    )
    return RehearsalState(buffer, representatives)


def make_predict(mesh: Mesh, apply_fn: Callable[..., Any], max_value: float):
    """Builds `predict(params, inputs) -> predicted class`, sharded over the batch."""

    def per_device(params, inputs):
        return apply_fn({"params": params}, normalise(inputs, max_value)).argmax(-1)

    return jax.jit(distributed.per_device(per_device, mesh, (P(), P(AXIS)), P(AXIS)))


def create_train_state(
    model, optimizer: optax.GradientTransformation, sample_input: jax.Array, key: jax.Array
) -> TrainState:
    """Fresh parameters and optimizer state."""
    init_key, rng = jax.random.split(key)
    params = model.init(init_key, sample_input)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=optimizer, rng=rng)
