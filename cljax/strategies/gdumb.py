"""GDumb: a class-balanced buffer, and a model trained from scratch on it alone."""

import dataclasses
from typing import Any, ClassVar

import jax

from cljax.components import argument
from cljax.strategies.base import LossTerms, StepOutputs, Strategy, register, safe


@register("gdumb")
@dataclasses.dataclass(frozen=True)
class GDumb(Strategy):
    """GDumb (Prabhu et al., ECCV 2020): the stream only fills the buffer, greedily keeping
    the classes seen equally represented (`buffer.policy=class_balanced`); before each
    evaluation a model trained from scratch on the buffer alone replaces the model: the
    loss is the representatives' cross-entropy in steps without new rows (the retraining),
    and zero in the stream's steps, which learn nothing."""

    uses_buffer: ClassVar[bool] = True
    buffer_policy: ClassVar[str | None] = "class_balanced"
    epochs: int = argument(30, "epochs over the buffer of each retraining", minimum=1)

    @property
    def retraining_epochs(self) -> int:
        return self.epochs

    def loss(self, outputs: StepOutputs, state: Any) -> tuple[jax.Array, LossTerms]:
        reps = outputs.reps
        replayed = outputs.cross_entropy(outputs.rep_logits, reps.labels, reps.weights)
        retraining = outputs.totals.batch == 0
        loss = replayed / safe(outputs.totals.reps) * retraining
        return loss, {"replay_ce": loss}
