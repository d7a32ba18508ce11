"""The lower and upper bounds: fine-tuning on the new task, and retraining on all tasks so far."""

import dataclasses
from typing import ClassVar

from cljax.strategies.base import Strategy, register


@register("incremental")
@dataclasses.dataclass(frozen=True)
class Incremental(Strategy):
    """Incremental fine-tuning: cross-entropy on the new task only (the lower bound)."""


@register("from_scratch")
@dataclasses.dataclass(frozen=True)
class FromScratch(Strategy):
    """Re-initialise, then train on the union of all tasks so far (the upper bound)."""

    reinitialise_each_task: ClassVar[bool] = True
    trains_on_seen_tasks: ClassVar[bool] = True
