"""Continual-learning strategies by name: what each trains on and whether it rehearses."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How a strategy differs from plain fine-tuning on the current task."""

    name: str
    description: str
    uses_buffer: bool = False
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
            uses_buffer=True,
        ),
    )
}
