"""Dark experience replay (DER) and DER++: replay of the logits stored with each sample."""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from cljax.buffer import Representatives
from cljax.components import argument
from cljax.strategies.base import LossTerms, StepOutputs, Strategy, register, safe


@register("der")
@dataclasses.dataclass(frozen=True)
class DER(Strategy):
    """Dark experience replay: CE(batch) + alpha * MSE(f(x_buf), z_buf), z_buf the logits
    stored with each sample at insertion."""

    uses_buffer: ClassVar[bool] = True
    alpha: float = argument(0.1, "weight of the logit-matching term", minimum=0)

    def stored_fields(self, num_classes: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {"logits": jax.ShapeDtypeStruct((num_classes,), np.dtype(np.float32))}

    def fields_to_store(self, outputs: StepOutputs) -> dict[str, jax.Array]:
        return {"logits": jax.lax.stop_gradient(outputs.logits).astype(jnp.float32)}

    def loss(self, outputs: StepOutputs, state: Any) -> tuple[jax.Array, LossTerms]:
        new = outputs.cross_entropy(outputs.logits, outputs.labels, outputs.weights) / safe(
            outputs.totals.batch
        )
        matching = logit_matching(outputs)
        return new + self.alpha * matching, {"new_ce": new, "logit_mse": matching}


@register("derpp")
@dataclasses.dataclass(frozen=True)
class DERpp(DER):
    """DER++: DER + beta * CE(f(x_buf'), y_buf').

    With `draws=1`, x_buf and x_buf' are one draw: the same r representatives serve both
    terms, which halves the replay traffic. With `draws=2` they are two independent draws of
    r, as in the DER paper (twice the exchange and twice the replayed rows per step).
    """

    beta: float = argument(0.5, "weight of the replayed labels' cross-entropy", minimum=0)
    draws: int = argument(
        1,
        "buffer draws per step: 1 (both replay terms see the same r representatives) or 2"
        " (one independent draw of r per term, as the DER paper)",
        choices=(1, 2),
    )

    @property
    def buffer_draws(self) -> int:
        return self.draws

    def loss(self, outputs: StepOutputs, state: Any) -> tuple[jax.Array, LossTerms]:
        if self.draws == 1:
            new, replayed = outputs.batch_and_replay_cross_entropy()
            new, replayed = new / safe(outputs.totals.batch), replayed / safe(outputs.totals.reps)
            matching = logit_matching(outputs)
        else:
            new = outputs.cross_entropy(outputs.logits, outputs.labels, outputs.weights)
            new = new / safe(outputs.totals.batch)
            reps, logits = _halves(outputs.reps), _halves(outputs.rep_logits)
            totals = outputs.collectives.sum((reps[0].weights.sum(), reps[1].weights.sum()))
            matching = _matching(logits[0], reps[0], totals[0])
            replayed = outputs.cross_entropy(logits[1], reps[1].labels, reps[1].weights)
            replayed = replayed / safe(totals[1])
        loss = new + self.alpha * matching + self.beta * replayed
        return loss, {"new_ce": new, "logit_mse": matching, "replay_ce": replayed}


def logit_matching(outputs: StepOutputs) -> jax.Array:
    """DER's term: the representatives' mean squared distance between their logits now and
    those stored with them, weighted, over the total weight of all devices' representatives."""
    return _matching(outputs.rep_logits, outputs.reps, outputs.totals.reps)


def _matching(rep_logits: jax.Array, reps: Representatives, total: jax.Array) -> jax.Array:
    squared = ((rep_logits - reps.data["logits"]) ** 2).mean(axis=-1)
    return (squared * reps.weights).sum() / safe(total)


def _halves(tree):
    """The two draws a pytree of rows holds, one after the other."""
    rows = jax.tree.leaves(tree)[0].shape[0] // 2
    return jax.tree.map(lambda x: x[:rows], tree), jax.tree.map(lambda x: x[rows:], tree)
