"""Experience replay, and ER with asymmetric cross-entropy (ER-ACE)."""

import dataclasses
from typing import Any, ClassVar

import jax

from cljax.strategies.base import LossTerms, StepOutputs, Strategy, masked, register, safe


@register("er")
@dataclasses.dataclass(frozen=True)
class ER(Strategy):
    """Experience replay: cross-entropy over the concatenation [batch ‖ representatives]."""

    uses_buffer: ClassVar[bool] = True

    def loss(self, outputs: StepOutputs, state: Any) -> tuple[jax.Array, LossTerms]:
        totals = outputs.totals
        new, replayed = outputs.batch_and_replay_cross_entropy()
        total = safe(totals.batch + totals.reps)
        return (new + replayed) / total, {"new_ce": new / total, "replay_ce": replayed / total}


@register("er_ace")
@dataclasses.dataclass(frozen=True)
class ERACE(Strategy):
    """ER with asymmetric cross-entropy (ER-ACE, Caccia et al., ICLR 2022): the new samples'
    cross-entropy sees only the logits of the current task's classes, so learning them does
    not push the old classes' logits down; the representatives' sees every class seen so far.
    Each term is a mean over its own rows (of all devices), as in the paper's code."""

    uses_buffer: ClassVar[bool] = True
    needs_task_classes: ClassVar[bool] = True

    def loss(self, outputs: StepOutputs, state: Any) -> tuple[jax.Array, LossTerms]:
        current = outputs.class_tasks == outputs.task_id
        seen = outputs.class_tasks <= outputs.task_id
        new = outputs.cross_entropy(
            masked(outputs.logits, current), outputs.labels, outputs.weights
        ) / safe(outputs.totals.batch)
        replayed = outputs.cross_entropy(
            masked(outputs.rep_logits, seen), outputs.reps.labels, outputs.reps.weights
        ) / safe(outputs.totals.reps)
        return new + replayed, {"new_ce": new, "replay_ce": replayed}
