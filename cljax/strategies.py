"""Continual-learning strategies by name: what each trains on and how it rehearses.

A strategy's loss sees the logits of one forward pass over [batch ‖ representatives]. Each
term is a sum over this device's rows divided by a total over all devices (`totals`), so
that summing the per-device losses gives the loss of the global batch.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from cljax.buffer import Representatives


@dataclasses.dataclass(frozen=True)
class Batch:
    """This device's rows of a training batch and of the representatives, with logits."""

    logits: jax.Array
    labels: jax.Array
    weights: jax.Array
    rep_logits: jax.Array
    reps: Representatives


@dataclasses.dataclass(frozen=True)
class Totals:
    """Sums over all devices of the batch weights and of the representatives' weights."""

    batch: jax.Array
    reps: jax.Array


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """DER's alpha (logit matching) and DER++'s beta (replayed labels)."""

    alpha: float = 0.1
    beta: float = 0.5


def _cross_entropy(logits, labels, weights) -> jax.Array:
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weights).sum()


def _safe(total: jax.Array) -> jax.Array:
    return jnp.maximum(total, 1e-12)


def fine_tune_loss(rows: Batch, totals: Totals, _: LossWeights) -> jax.Array:
    """Cross-entropy on the new samples only."""
    return _cross_entropy(rows.logits, rows.labels, rows.weights) / _safe(totals.batch)


def replay_loss(rows: Batch, totals: Totals, _: LossWeights) -> jax.Array:
    """ER: cross-entropy over the concatenation [batch ‖ representatives]."""
    replayed = _cross_entropy(rows.rep_logits, rows.reps.labels, rows.reps.weights)
    new = _cross_entropy(rows.logits, rows.labels, rows.weights)
    return (new + replayed) / _safe(totals.batch + totals.reps)


def _logit_matching(rows: Batch, totals: Totals) -> jax.Array:
    squared = ((rows.rep_logits - rows.reps.data["logits"]) ** 2).mean(axis=-1)
    return (squared * rows.reps.weights).sum() / _safe(totals.reps)


def der_loss(rows: Batch, totals: Totals, weights: LossWeights) -> jax.Array:
    """DER: CE(batch) + alpha * MSE(f(x_buf), z_buf), z_buf the logits stored at insertion."""
    return fine_tune_loss(rows, totals, weights) + weights.alpha * _logit_matching(rows, totals)


def derpp_loss(rows: Batch, totals: Totals, weights: LossWeights) -> jax.Array:
    """DER++: DER + beta * CE(f(x_buf'), y_buf').

    x_buf and x_buf' are one draw: the same r representatives serve both terms (the DER
    paper draws twice; one draw halves the replay traffic).
    """
    replayed = _cross_entropy(rows.rep_logits, rows.reps.labels, rows.reps.weights)
    return der_loss(rows, totals, weights) + weights.beta * replayed / _safe(totals.reps)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How a strategy differs from plain fine-tuning on the current task."""

    name: str
    description: str
    loss: Callable[[Batch, Totals, LossWeights], jax.Array] = fine_tune_loss
    uses_buffer: bool = False
    stores_logits: bool = False
    reinitialise_each_task: bool = False
    trains_on_seen_tasks: bool = False


STRATEGIES = {
    strategy.name: strategy
    for strategy in (
        Strategy("incremental", "fine-tune on the new task only (lower bound)"),
        Strategy(
            "from_scratch",
            "re-initialise, then train on the union of all tasks so far (upper bound)",
            reinitialise_each_task=True,
            trains_on_seen_tasks=True,
        ),
        Strategy(
            "er",
            "experience replay: r representatives from the global buffer in every batch",
            loss=replay_loss,
            uses_buffer=True,
        ),
        Strategy(
            "der",
            "dark experience replay: match the logits stored with each representative",
            loss=der_loss,
            uses_buffer=True,
            stores_logits=True,
        ),
        Strategy(
            "derpp",
            "DER++: DER plus cross-entropy on the representatives' labels",
            loss=derpp_loss,
            uses_buffer=True,
            stores_logits=True,
        ),
    )
}
