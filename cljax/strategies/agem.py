"""Averaged GEM: the new task's gradient projected against the old tasks' representatives."""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from cljax.strategies.base import LossTerms, StepOutputs, Strategy, register, safe


@register("agem")
@dataclasses.dataclass(frozen=True)
class AGEM(Strategy):
    """Averaged GEM (Chaudhry et al., ICLR 2019): the gradient of the new rows' cross-entropy,
    projected where it would raise the loss on the representatives of earlier tasks: with g
    that gradient and g_ref the representatives', g - (g.g_ref / g_ref.g_ref) g_ref where
    g.g_ref < 0. Both are gradients of the global batch (summed over devices), so every
    device projects alike. The representatives of the task being trained are left out."""

    uses_buffer: ClassVar[bool] = True
    gradient_terms: ClassVar[tuple[str, ...]] = ("new_ce", "reference_ce")

    def loss(self, outputs: StepOutputs, state: Any) -> tuple[jax.Array, LossTerms]:
        reps = outputs.reps
        weights = reps.weights * (reps.task_ids < outputs.task_id)
        total = outputs.collectives.sum(weights.sum())
        new = outputs.cross_entropy(outputs.logits, outputs.labels, outputs.weights)
        new = new / safe(outputs.totals.batch)
        reference = outputs.cross_entropy(outputs.rep_logits, reps.labels, weights) / safe(total)
        return new, {"new_ce": new, "reference_ce": reference}

    def combine_gradients(self, gradients: dict[str, Any]) -> Any:
        new, reference = gradients["new_ce"], gradients["reference_ce"]
        dot, norm = tree_dot(new, reference), tree_dot(reference, reference)
        scale = jnp.where(dot < 0, dot / safe(norm), 0.0)
        return jax.tree.map(lambda g, r: g - scale * r, new, reference)


def tree_dot(a, b) -> jax.Array:
    """The dot product of two pytrees of the same structure, as flat vectors."""
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
