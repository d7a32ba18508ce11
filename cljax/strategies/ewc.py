"""Online EWC: a quadratic penalty weighted by a Fisher information gathered after each task."""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from cljax.components import argument
from cljax.strategies.base import LossTerms, StepOutputs, Strategy, register, safe


@register("ewc_online")
@dataclasses.dataclass(frozen=True)
class OnlineEWC(Strategy):
    """Online EWC (Schwarz et al., ICML 2018, as in the DER paper's code): cross-entropy
    plus `penalty_weight` (lambda) times sum_i F_i (theta_i - theta*_i)^2, theta* the
    parameters at the end of the last task and F a diagonal Fisher information. After each
    task a pass over its training rows gives that task's F: the mean over rows of p(y|x) (d
    log p(y|x) / d theta)^2 at the task's final parameters, each row's gradient on its own,
    summed over every device's rows; F <- `gamma` F + F_task. No buffer; F and theta* are
    the strategy's own state."""

    needs_task_pass: ClassVar[bool] = True
    penalty_weight: float = argument(90.0, "weight of the quadratic penalty (lambda)", minimum=0)
    gamma: float = argument(1.0, "decay of the earlier tasks' Fisher information", minimum=0)

    def init_state(self, variables) -> Any:
        params = variables["params"]
        anchor = jax.tree.map(jnp.copy, params)
        return {"fisher": jax.tree.map(jnp.zeros_like, params), "anchor": anchor}

    def loss(self, outputs: StepOutputs, state: Any) -> tuple[jax.Array, LossTerms]:
        new, _ = super().loss(outputs, state)
        squared = jax.tree.map(
            lambda fisher, theta, anchor: (fisher * (theta - anchor) ** 2).sum(),
            state["fisher"],
            outputs.params,
            state["anchor"],
        )
        # The same on every device: each holds its share, so that the step's sum is one.
        penalty = sum(jax.tree.leaves(squared)) / outputs.collectives.num_devices()
        return new + self.penalty_weight * penalty, {"new_ce": new, "penalty": penalty}

    def task_pass_sums(self, state, variables, apply, inputs, labels, weights) -> Any:
        def row_fisher(row, label, weight):
            def log_likelihood(params):
                logits = apply({**variables, "params": params}, row[None])[0]
                return jax.nn.log_softmax(logits.astype(jnp.float32))[label]

            value, grad = jax.value_and_grad(log_likelihood)(variables["params"])
            return jax.tree.map(lambda g: weight * jnp.exp(value) * g**2, grad)

        return chunked_row_sums(row_fisher, (inputs, labels, weights))

    def end_task(self, state, variables, sums, count) -> Any:
        fisher = jax.tree.map(
            lambda old, new: self.gamma * old + new / safe(count), state["fisher"], sums
        )
        return {"fisher": fisher, "anchor": jax.tree.map(jnp.copy, variables["params"])}


def chunked_row_sums(row_fn: Callable, rows: tuple, chunk: int | None = None) -> Any:
    """The sum over rows of `row_fn(*row)`, `chunk` rows at a time (vmapped, in a scan), so
    that per-row values as large as a gradient never exist for more than `chunk` rows.

    By default 16 rows, but one on a CPU: XLA:CPU computes a vmapped per-row gradient's
    outer products (a batched product over a dimension of 1) one element at a time, 500 us
    a row of the DER paper's MLP against 35 us one row after another (the Fisher pass of
    Split MNIST's online EWC: 9 s a task, then 0.4 s)."""
    if chunk is None:
        chunk = 1 if jax.default_backend() == "cpu" else 16
    count = rows[0].shape[0]
    size = math.gcd(count, chunk)
    blocks = jax.tree.map(lambda x: x.reshape(count // size, size, *x.shape[1:]), rows)

    def block_sum(block):
        return jax.tree.map(lambda v: v.sum(0), jax.vmap(row_fn)(*block))

    def add_block(total, block):
        return jax.tree.map(jnp.add, total, block_sum(block)), None

    # The first block's sum starts the scan: it has the type (per device) of the others.
    first = block_sum(jax.tree.map(lambda x: x[0], blocks))
    return jax.lax.scan(add_block, first, jax.tree.map(lambda x: x[1:], blocks))[0]
