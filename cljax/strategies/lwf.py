"""Learning without Forgetting: distillation to the model as the task began."""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from cljax.components import argument
from cljax.strategies.base import LossTerms, StepOutputs, Strategy, masked, register, safe


@register("lwf")
@dataclasses.dataclass(frozen=True)
class LwF(Strategy):
    """Learning without Forgetting (Li & Hoiem, 2016), class-incremental as in the DER
    paper's code: cross-entropy over the classes seen so far, plus alpha times the
    distillation of the old classes' outputs: the cross-entropy, at temperature T, from the
    softmax over the old classes of the model as it was when the task began (the teacher:
    its own state, kept in checkpoints) to that of the model being trained. No buffer."""

    needs_task_classes: ClassVar[bool] = True
    alpha: float = argument(1.0, "weight of the distillation term", minimum=0)
    temperature: float = argument(2.0, "softmax temperature of the distillation", minimum=1e-3)

    def init_state(self, variables) -> Any:
        return jax.tree.map(jnp.copy, variables)

    def begin_task(self, state: Any, variables, task: int) -> Any:
        return jax.tree.map(jnp.copy, variables)

    def loss(self, outputs: StepOutputs, teacher: Any) -> tuple[jax.Array, LossTerms]:
        seen = outputs.class_tasks <= outputs.task_id
        old = outputs.class_tasks < outputs.task_id
        total = safe(outputs.totals.batch)
        new = outputs.cross_entropy(masked(outputs.logits, seen), outputs.labels, outputs.weights)
        batch_inputs = outputs.inputs[: outputs.labels.shape[0]]
        target = jax.lax.stop_gradient(outputs.apply(teacher, batch_inputs))
        rows = optax.softmax_cross_entropy(
            masked(outputs.logits, old) / self.temperature,
            jax.nn.softmax(masked(target.astype(jnp.float32), old) / self.temperature),
        )
        # The first task has no old classes: its distillation term is zero.
        distillation = (rows * outputs.weights).sum() / total * (outputs.task_id > 0)
        new = new / total
        return new + self.alpha * distillation, {"new_ce": new, "distillation": distillation}
