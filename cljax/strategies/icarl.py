"""iCaRL: herding of each class's exemplars, distillation, nearest mean of exemplars."""

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.buffer import BufferState
from cljax.strategies.base import (
    MASKED_LOGIT,
    LossTerms,
    StepOutputs,
    Strategy,
    TaskRows,
    register,
    safe,
)


@register("icarl")
@dataclasses.dataclass(frozen=True)
class ICaRL(Strategy):
    """iCaRL (Rebuffi et al., CVPR 2017), as in the DER paper's code.

    Loss: over [batch ‖ representatives], each row's binary cross-entropy with logits, mean
    over the classes seen so far, against targets that are the row's one-hot label on the
    current task's classes and, on the old classes, the sigmoid of the logits of the model
    as the task began (the teacher, the strategy's own state). The buffer (policy
    `end_of_task`) is filled at each task's end: with S classes seen and N slots per device,
    each class keeps m = N // S exemplars per device: an old class its first m (in herding
    order), a new class the m of the device's rows of the task chosen by herding against the
    class's mean feature over all devices. Evaluation ranks the classes by the distance of
    an input's feature to each class's mean feature over the exemplars of the global buffer.
    A feature is the input of the model's last Dense layer (its classifier).
    """

    uses_buffer: ClassVar[bool] = True
    needs_task_classes: ClassVar[bool] = True
    needs_task_pass: ClassVar[bool] = True
    collects_task_rows: ClassVar[bool] = True
    buffer_policy: ClassVar[str | None] = "end_of_task"

    def init_state(self, variables) -> Any:
        features, num_classes = classifier_shape(variables["params"])
        return {
            "teacher": jax.tree.map(jnp.copy, variables),
            "class_means": jnp.zeros((num_classes, features), jnp.float32),
            "has_mean": jnp.zeros(num_classes, bool),
        }

    def begin_task(self, state: Any, variables, task: int) -> Any:
        return {**state, "teacher": jax.tree.map(jnp.copy, variables)}

    def loss(self, outputs: StepOutputs, state: Any) -> tuple[jax.Array, LossTerms]:
        seen = outputs.class_tasks <= outputs.task_id
        old = outputs.class_tasks < outputs.task_id
        current = outputs.class_tasks == outputs.task_id
        logits = jnp.concatenate([outputs.logits, outputs.rep_logits])
        labels = jnp.concatenate([outputs.labels, outputs.reps.labels])
        weights = jnp.concatenate([outputs.weights, outputs.reps.weights])
        teacher = jax.lax.stop_gradient(outputs.apply(state["teacher"], outputs.inputs))
        targets = jnp.where(
            old,
            jax.nn.sigmoid(teacher.astype(jnp.float32)),
            jax.nn.one_hot(labels, logits.shape[-1]) * current,
        )
        bce = optax.sigmoid_binary_cross_entropy(logits, targets)
        rows = (bce * seen).sum(-1) / seen.sum()
        loss = (rows * weights).sum() / safe(outputs.totals.batch + outputs.totals.reps)
        return loss, {"bce": loss}

    def end_task_with_rows(self, state: Any, variables, context: TaskRows) -> tuple:
        model = _Features(variables, context)
        buffer = herd_into_buffer(context, model(context.inputs)[0])
        slots = buffer.labels.shape[1]
        filled = jnp.arange(slots) < buffer.counts[0]
        features = model(buffer.data["inputs"][0])[0]
        members = jax.nn.one_hot(buffer.labels[0], len(context.class_tasks)) * filled[:, None]
        sums, counts = context.collectives.sum((members.T @ features, members.sum(0)))
        state = {
            **state,
            "class_means": sums / jnp.maximum(counts, 1.0)[:, None],
            "has_mean": counts > 0,
        }
        return state, buffer

    def evaluation_logits(self, state: Any, variables, apply: Callable, inputs) -> jax.Array:
        features, _ = features_and_logits(apply, variables, inputs)
        distances = ((features[:, None, :] - state["class_means"][None]) ** 2).sum(-1)
        return jnp.where(state["has_mean"], -distances, MASKED_LOGIT)


def classifier_shape(params) -> tuple[int, int]:
    """(features, classes) of the model's last Dense layer: the kernel of the module that
    was created last."""
    module = params
    while isinstance(module, dict) and "kernel" not in module:
        module = list(module.values())[-1]
    kernel = module["kernel"]
    if kernel.ndim != 2:
        raise ValueError(f"the model's last layer has a kernel of shape {kernel.shape}, not Dense")
    return kernel.shape[0], kernel.shape[1]


def features_and_logits(apply: Callable, variables, inputs) -> tuple[jax.Array, jax.Array]:
    """The input of the model's last Dense layer (float32) and the model's logits."""
    captured = []

    def capture(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            captured.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        logits = apply(variables, inputs)
    features = captured[-1]
    return features.reshape(features.shape[0], -1).astype(jnp.float32), logits


@dataclasses.dataclass(frozen=True)
class _Features:
    """The features of stored inputs, as the model sees them."""

    variables: Any
    context: TaskRows

    def __call__(self, stored: jax.Array) -> tuple[jax.Array, jax.Array]:
        return features_and_logits(
            self.context.apply, self.variables, self.context.normalise(stored)
        )


def class_order(class_tasks: tuple[int, ...]) -> np.ndarray:
    """The classes by task, then by index: the classes seen after any task are a prefix."""
    return np.asarray(sorted(range(len(class_tasks)), key=lambda c: (class_tasks[c], c)))


def herd_into_buffer(context: TaskRows, features: jax.Array) -> BufferState:
    """This device's buffer after the task: with S classes seen and N slots, the k-th seen
    class (`class_order`) holds slots [k m, (k + 1) m), m = N // S; an old class keeps the
    first m of its previous slots, a new class gets the m rows herding picks."""
    buffer, class_tasks = context.buffer, np.asarray(context.class_tasks)
    slots = buffer.labels.shape[1]
    order = class_order(context.class_tasks)
    new_per_task = int(np.bincount(class_tasks).max())
    num_old = (class_tasks < context.task_id).sum()
    num_seen = (class_tasks <= context.task_id).sum()
    per_class, old_per_class = slots // num_seen, slots // jnp.maximum(num_old, 1)
    new_classes = jnp.asarray(order)[
        jnp.minimum(num_old + jnp.arange(new_per_task), len(order) - 1)
    ]
    normalised = features / jnp.maximum(jnp.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    members = (context.labels[None, :] == new_classes[:, None]) & context.valid[None, :]
    sums, counts = context.collectives.sum(
        (members.astype(jnp.float32) @ normalised, members.sum(1))
    )
    means = sums / jnp.maximum(counts, 1)[:, None]
    picks = jax.vmap(lambda member, mean: herd(normalised, member, mean, per_class, slots))(
        members, means
    )
    slot = jnp.arange(slots)
    rank, position = slot // per_class, slot % per_class
    owner = jnp.asarray(order)[jnp.minimum(rank, len(order) - 1)]
    is_old = rank < num_old
    old_slot = rank * old_per_class + position
    new_row = picks[jnp.clip(rank - num_old, 0, new_per_task - 1), position]
    inputs = jnp.where(
        _rows_like(is_old, context.inputs),
        buffer.data["inputs"][0][old_slot],
        context.inputs[new_row],
    )
    return BufferState(
        data={"inputs": inputs[None]},
        labels=owner[None].astype(buffer.labels.dtype),
        task_ids=jnp.asarray(class_tasks, jnp.int32)[owner][None],
        counts=(num_seen * per_class).astype(buffer.counts.dtype)[None],
        seen=buffer.seen,
    )


def _rows_like(mask: jax.Array, rows: jax.Array) -> jax.Array:
    """`mask` [N] shaped to broadcast over rows of `rows`' trailing dimensions."""
    return mask.reshape(mask.shape + (1,) * (rows.ndim - 1))


def herd(features: jax.Array, member: jax.Array, mean: jax.Array, quota, length: int):
    """`length` row indices: the first `quota` picked by herding among the `member` rows
    (each the row that brings the mean of those picked so far nearest `mean`, without
    replacement while members remain), the rest repeats."""
    features, member, mean = jnp.asarray(features), jnp.asarray(member), jnp.asarray(mean)

    def pick(carry, step):
        running, taken = carry
        available = member & ~taken
        pool = jnp.where(available.any(), available, member)
        cost = jnp.linalg.norm(mean - (features + running) / (step + 1), axis=1)
        row = jnp.argmin(jnp.where(pool, cost, jnp.inf))
        active = step < quota
        running = running + jnp.where(active, features[row], 0.0)
        taken = taken.at[row].set(taken[row] | active)
        return (running, taken), row

    start = (jnp.zeros_like(features[0]), jnp.zeros_like(member))
    return jax.lax.scan(pick, start, jnp.arange(length))[1]
