"""The buffer's state types: one device's slots, the representatives it draws, and the pair
a train step carries. All are pytrees: they go through `jit`, `shard_map` and checkpoints."""

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np

POLICIES = ("reservoir", "random_replace", "class_balanced", "end_of_task")
STREAM_POLICIES = ("class_balanced", "end_of_task")  # for partition=stream, on the devices
PARTITIONS = ("class", "stream")
DRAWS = ("with_replacement", "without_replacement")
MEMORY_KINDS = ("device", "pinned_host")
LABELS, MASK, TASK_ID = "labels", "mask", "task_id"

Example = Mapping[str, jax.ShapeDtypeStruct | jax.Array | np.ndarray]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BufferState:
    """One device's buffer: slots [P, N, ...] in P partitions (the C classes, or one for
    the whole stream) and per-partition counters [P]."""

    data: dict[str, jax.Array]
    labels: jax.Array
    task_ids: jax.Array
    counts: jax.Array
    seen: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Representatives:
    """Samples drawn from the global buffer; weight 0 marks no sample."""

    data: dict[str, jax.Array]
    labels: jax.Array
    task_ids: jax.Array
    weights: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RehearsalState:
    """What a train step carries of the buffer: the buffer itself and the representatives
    it drew for the next step, each split over the devices."""

    buffer: BufferState
    representatives: Representatives
