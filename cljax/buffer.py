"""The distributed rehearsal buffer: a pure-functional pytree, one shard per device.

Per device the buffer holds `budget_per_class` (N) slots for each class. Inputs keep the
dataset's stored dtype (uint8 images stay uint8), next to their label and task id.

Per step and per device:
- `insert` adds `num_candidates` (c) samples drawn uniformly from the local batch. Policy
  `reservoir` keeps, per class, a uniform sample of all candidates of that class seen so far
  on this device; `random_replace` fills free slots first and then overwrites a uniformly
  chosen slot of the class, which favours recent samples. Candidates of one class in one
  step are applied as if inserted one after another.
- `sample_global` gives each device `r` representatives drawn from the union of all
  devices' buffers with a single `all_to_all`: every device sends ceil(r/D) uniform draws
  from its own filled slots to every device. Each representative carries an importance
  weight D * F_owner / F_total (F = filled slots), so that, in expectation, the loss sees
  every filled slot of the global buffer with equal weight even when devices are filled
  unevenly; the weight is 1 when fills are equal, and 0 for an owner with nothing stored
  (never a garbage sample in the loss).

The functions here work on one device's shard (no leading device axis) and run inside
`shard_map`; `init_sharded` builds the global state, stacked along the device axis.
"""

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cljax.collectives import Collectives
from cljax.distributed import sharded

POLICIES = ("reservoir", "random_replace")


@flax.struct.dataclass
class BufferState:
    """One device's buffer: class-partitioned slots [C, N] and per-class counters [C]."""

    inputs: jax.Array
    labels: jax.Array
    task_ids: jax.Array
    counts: jax.Array
    seen: jax.Array

    @property
    def num_classes(self) -> int:
        return self.labels.shape[-2]

    @property
    def budget_per_class(self) -> int:
        return self.labels.shape[-1]


@flax.struct.dataclass
class Representatives:
    """Samples drawn from the global buffer for the next step; weight 0 marks no sample."""

    inputs: jax.Array
    labels: jax.Array
    weights: jax.Array


def init_buffer(
    num_classes: int, budget_per_class: int, input_shape: Sequence[int], dtype
) -> BufferState:
    """An empty buffer for one device."""
    slots = (num_classes, budget_per_class)
    return BufferState(
        inputs=jnp.zeros((*slots, *input_shape), dtype),
        labels=jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32)[:, None], slots),
        task_ids=jnp.full(slots, -1, jnp.int32),
        counts=jnp.zeros(num_classes, jnp.int32),
        seen=jnp.zeros(num_classes, jnp.int32),
    )


def init_representatives(num: int, input_shape: Sequence[int], dtype) -> Representatives:
    """`num` empty representatives (all weights 0), for the first step."""
    return Representatives(
        inputs=jnp.zeros((num, *input_shape), dtype),
        labels=jnp.zeros(num, jnp.int32),
        weights=jnp.zeros(num, jnp.float32),
    )


def init_sharded(mesh: Mesh, make_local, *args) -> jax.Array:
    """`make_local(*args)` stacked once per device and sharded along the mesh axis."""
    num_devices = mesh.devices.size

    def stacked():
        return jax.tree.map(
            lambda leaf: jnp.broadcast_to(leaf, (num_devices, *leaf.shape)), make_local(*args)
        )

    return jax.jit(stacked, out_shardings=sharded(mesh))()


def insert(
    buffer: BufferState,
    inputs: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    task_id: jax.Array,
    key: jax.Array,
    num_candidates: int,
    policy: str = "reservoir",
) -> BufferState:
    """Inserts `num_candidates` samples drawn uniformly from the valid rows of the batch."""
    pick_key, slot_key = jax.random.split(key)
    scores = jnp.where(mask, jax.random.uniform(pick_key, mask.shape), 2.0)
    chosen = jnp.argsort(scores)[:num_candidates]
    valid = mask[chosen]
    classes = labels[chosen]

    position = _position_in_class_stream(buffer.seen, classes, valid)
    slot, accepted = _choose_slots(position, buffer.budget_per_class, slot_key, policy)
    target = classes * buffer.budget_per_class + slot
    write = valid & accepted & ~_overwritten_later(target, valid & accepted)
    num_slots = buffer.num_classes * buffer.budget_per_class
    target = jnp.where(write, target, num_slots)

    def scatter(stored: jax.Array, values: jax.Array) -> jax.Array:
        flat = stored.reshape(num_slots, *stored.shape[2:])
        return flat.at[target].set(values, mode="drop").reshape(stored.shape)

    seen = buffer.seen + jnp.zeros_like(buffer.seen).at[classes].add(valid.astype(jnp.int32))
    return BufferState(
        inputs=scatter(buffer.inputs, inputs[chosen]),
        labels=scatter(buffer.labels, classes),
        task_ids=scatter(buffer.task_ids, jnp.full_like(classes, task_id)),
        counts=jnp.minimum(seen, buffer.budget_per_class),
        seen=seen,
    )


def _position_in_class_stream(seen: jax.Array, classes: jax.Array, valid: jax.Array) -> jax.Array:
    """0-based index of each candidate among all candidates of its class so far."""
    same_class = (classes[:, None] == classes[None, :]) & valid[None, :]
    earlier_same_class = jnp.tril(same_class, k=-1).sum(axis=1)
    return seen[classes] + earlier_same_class


def _choose_slots(
    position: jax.Array, budget: int, key: jax.Array, policy: str
) -> tuple[jax.Array, jax.Array]:
    """Slot per candidate and whether it is stored: free slots first, then by policy."""
    if policy == "reservoir":
        replaced = jax.random.randint(key, position.shape, 0, position + 1)
    elif policy == "random_replace":
        replaced = jax.random.randint(key, position.shape, 0, budget)
    else:
        raise ValueError(f"buffer.policy={policy!r} is not one of {POLICIES}")
    slot = jnp.where(position < budget, position, replaced)
    return slot, slot < budget


def _overwritten_later(target: jax.Array, writes: jax.Array) -> jax.Array:
    """True where a later candidate writes the same slot (sequential semantics)."""
    same_target = (target[:, None] == target[None, :]) & writes[None, :]
    return jnp.triu(same_target, k=1).any(axis=1)


def draw_uniform(buffer: BufferState, key: jax.Array, num: int) -> tuple[jax.Array, jax.Array]:
    """`num` draws (with replacement) from this device's filled slots, as flat slot ids.

    Returns slot ids and this device's number of filled slots; ids are meaningless when
    nothing is filled.
    """
    filled = buffer.counts.sum()
    rank = jax.random.randint(key, (num,), 0, jnp.maximum(filled, 1))
    ends = jnp.cumsum(buffer.counts)
    classes = jnp.searchsorted(ends, rank, side="right")
    classes = jnp.minimum(classes, buffer.num_classes - 1)
    offset = rank - (ends[classes] - buffer.counts[classes])
    return classes * buffer.budget_per_class + offset, filled


def sample_global(
    buffer: BufferState, key: jax.Array, num: int, collectives: Collectives
) -> Representatives:
    """`num` representatives from the union of all devices' buffers, in one all_to_all."""
    num_devices = collectives.num_devices()
    per_owner = -(-num // num_devices)
    draw_key, keep_key = jax.random.split(key)
    slots, filled = draw_uniform(buffer, draw_key, num_devices * per_owner)
    flat_inputs = buffer.inputs.reshape(-1, *buffer.inputs.shape[2:])
    outgoing = (
        flat_inputs[slots].reshape(num_devices, per_owner, *flat_inputs.shape[1:]),
        buffer.labels.reshape(-1)[slots].reshape(num_devices, per_owner),
        jnp.broadcast_to(filled, (num_devices, 1)),
    )
    inputs, labels, owner_filled = collectives.all_to_all(outgoing)
    owner_filled = owner_filled[:, 0].astype(jnp.float32)
    total = owner_filled.sum()
    owner_weight = jnp.where(total > 0, num_devices * owner_filled / jnp.maximum(total, 1), 0.0)
    weights = jnp.broadcast_to(owner_weight[:, None], (num_devices, per_owner))

    keep = jax.random.permutation(keep_key, num_devices * per_owner)[:num]
    return Representatives(
        inputs=inputs.reshape(-1, *inputs.shape[2:])[keep],
        labels=labels.reshape(-1)[keep],
        weights=weights.reshape(-1)[keep],
    )
