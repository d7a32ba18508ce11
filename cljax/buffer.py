"""The distributed rehearsal buffer: a pure-functional pytree, one shard per device.

Per device the buffer holds `budget_per_class` (N) slots for each class. Each slot stores
one sample record: one or more tensors (`data`: the input, and optionally DER logits or
extra targets, each with its own shape and dtype; uint8 images stay uint8), its label and
its task id. Per class it counts filled slots and candidates seen.

Per step and per device:
- `insert` adds `num_candidates` (c) samples drawn uniformly from the valid rows of the
  local batch. Policy `reservoir` (default) keeps, per class, a uniform sample of every
  candidate of that class seen so far on this device: the k-th (0-based) goes to a free
  slot if k < N, else replaces a uniform slot with probability N/(k+1). `random_replace`
  (the reference implementation) also fills free slots first, then always replaces a
  uniform slot of the class, which favours recent samples. Candidates of one class in one
  step are applied as if inserted one after another.
- `sample_global` gives every device exactly `r` representatives drawn from the union of
  all devices' buffers, in one round of collectives and with no request: every owner draws
  r samples uniformly from its own filled slots and sends q = r // D of them to every
  device with one `all_to_all`, and its r mod D others to the devices at offsets
  s, s+1, ... (s: a random shift shared by all devices) with collective permutes. Every
  device therefore receives exactly r samples, and each owner's expected share is r/D. When
  all devices hold equally many samples every filled slot of the global buffer is equally
  likely. When fills differ, a sample from owner i (F_i filled slots, F in total) is drawn
  with probability 1/(D F_i) and carries the importance weight D F_i / F, so that in
  expectation every filled slot weighs the same in the loss; the weight is 1 when fills are
  equal and 0 when the owner holds nothing (an empty slot never reaches the loss).

The functions here work on one device's shard (no leading device axis) inside `shard_map`;
`init_sharded` builds the global state, stacked along the device axis.
"""

from collections.abc import Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compute_on import compute_on
from jax.sharding import Mesh

from cljax.collectives import Collectives
from cljax.distributed import sharded

POLICIES = ("reservoir", "random_replace")
MEMORY_KINDS = ("device", "pinned_host")

Spec = Mapping[str, tuple[Sequence[int], np.dtype]]


@flax.struct.dataclass
class BufferState:
    """One device's buffer: class-partitioned slots [C, N, ...] and per-class counters [C]."""

    data: dict[str, jax.Array]
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

    data: dict[str, jax.Array]
    labels: jax.Array
    task_ids: jax.Array
    weights: jax.Array


def init_buffer(num_classes: int, budget_per_class: int, spec: Spec) -> BufferState:
    """An empty buffer for one device; `spec` maps each stored tensor to (shape, dtype)."""
    slots = (num_classes, budget_per_class)
    return BufferState(
        data={name: jnp.zeros((*slots, *shape), dtype) for name, (shape, dtype) in spec.items()},
        labels=jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32)[:, None], slots),
        task_ids=jnp.full(slots, -1, jnp.int32),
        counts=jnp.zeros(num_classes, jnp.int32),
        seen=jnp.zeros(num_classes, jnp.int32),
    )


def init_representatives(num: int, spec: Spec) -> Representatives:
    """`num` empty representatives (all weights 0), for the first step."""
    return Representatives(
        data={name: jnp.zeros((num, *shape), dtype) for name, (shape, dtype) in spec.items()},
        labels=jnp.zeros(num, jnp.int32),
        task_ids=jnp.full(num, -1, jnp.int32),
        weights=jnp.zeros(num, jnp.float32),
    )


def init_sharded(mesh: Mesh, make_local, *args, shardings=None):
    """`make_local(*args)` stacked once per device and sharded along the mesh axis (or
    placed by `shardings`, a pytree prefix of the result)."""
    num_devices = mesh.devices.size

    def stacked():
        return jax.tree.map(
            lambda leaf: jnp.broadcast_to(leaf, (num_devices, *leaf.shape)), make_local(*args)
        )

    return jax.jit(stacked, out_shardings=shardings or sharded(mesh))()


def buffer_shardings(mesh: Mesh, memory_kind: str = "device") -> BufferState:
    """Where a sharded buffer lives: its slots in `memory_kind` (e.g. pinned host memory),
    its per-class counters on the device."""
    slots, counters = sharded(mesh).with_memory_kind(memory_kind), sharded(mesh)
    return BufferState(slots, slots, slots, counters, counters)


def record_bytes(spec: Spec) -> int:
    """Bytes of one stored sample: its tensors, label and task id."""
    tensors = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in spec.values())
    return tensors + 2 * np.dtype(np.int32).itemsize


def insert(
    buffer: BufferState,
    samples: Mapping[str, jax.Array],
    labels: jax.Array,
    mask: jax.Array,
    task_id: jax.Array,
    key: jax.Array,
    num_candidates: int,
    policy: str = "reservoir",
    on_host: bool = False,
) -> BufferState:
    """Inserts `num_candidates` rows drawn uniformly from the valid rows of the batch.

    `samples` holds one batch-major tensor per name of `buffer.data`. `on_host`: the slots
    are in host memory; slots are chosen on the device and written by the host.
    """
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

    write_rows = _host_write_rows if on_host else _write_rows

    def scatter(stored: jax.Array, values: jax.Array) -> jax.Array:
        return write_rows(stored, target, values)

    seen = buffer.seen + jnp.zeros_like(buffer.seen).at[classes].add(valid.astype(jnp.int32))
    return BufferState(
        data={name: scatter(buffer.data[name], samples[name][chosen]) for name in buffer.data},
        labels=scatter(buffer.labels, classes),
        task_ids=scatter(buffer.task_ids, jnp.full_like(classes, task_id)),
        counts=jnp.minimum(seen, buffer.budget_per_class),
        seen=seen,
    )


def _write_rows(stored: jax.Array, target: jax.Array, values: jax.Array) -> jax.Array:
    """`stored` [C, N, ...] with flat slots `target` set to `values` (out of range: dropped)."""
    flat = stored.reshape(-1, *stored.shape[2:])
    return flat.at[target].set(values, mode="drop").reshape(stored.shape)


def _read_rows(stored: jax.Array, slots: jax.Array) -> jax.Array:
    """Rows of `stored` [C, N, ...] at flat slots `slots`."""
    return stored.reshape(-1, *stored.shape[2:])[slots]


_on_host = compute_on("device_host")


def _host_write_rows(stored: jax.Array, target: jax.Array, values: jax.Array) -> jax.Array:
    """`_write_rows` run by the host on slots in host memory."""
    host = jax.memory.Space.Host
    write = _on_host(jax.jit(_write_rows))
    return write(stored, jax.device_put(target, host), jax.device_put(values, host))


def _host_read_rows(stored: jax.Array, slots: jax.Array) -> jax.Array:
    """`_read_rows` run by the host on slots in host memory; the rows go to the device."""
    rows = _on_host(jax.jit(_read_rows))(stored, jax.device_put(slots, jax.memory.Space.Host))
    return jax.device_put(rows, jax.memory.Space.Device)


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

    Returns the slot ids and this device's number of filled slots; the ids are meaningless
    when nothing is filled.
    """
    filled = buffer.counts.sum()
    rank = jax.random.randint(key, (num,), 0, jnp.maximum(filled, 1))
    ends = jnp.cumsum(buffer.counts)
    classes = jnp.minimum(jnp.searchsorted(ends, rank, side="right"), buffer.num_classes - 1)
    offset = rank - (ends[classes] - buffer.counts[classes])
    return classes * buffer.budget_per_class + offset, filled


def sample_global(
    buffer: BufferState,
    key: jax.Array,
    shared_key: jax.Array,
    num: int,
    collectives: Collectives,
    on_host: bool = False,
) -> Representatives:
    """`num` representatives from the union of all devices' buffers (see module docstring).

    `key` must differ between devices and `shared_key` must be the same on all of them.
    Each record travels as one row of bytes, so a step costs one `all_to_all` and at most
    D - 1 collective permutes whatever the number of stored tensors. `on_host`: the buffer
    is in host memory; the draw runs there and only the `num` records move to the device.
    """
    num_devices = collectives.num_devices()
    bulk_rows = num // num_devices * num_devices
    outgoing, filled = draw_records(buffer, key, num, on_host)
    packed = _pack(outgoing)
    bulk = collectives.all_to_all(packed[:bulk_rows].reshape(num_devices, -1, packed.shape[1]))
    shift = jax.random.randint(shared_key, (), 0, num_devices)
    rest = collectives.receive_shifted(packed[bulk_rows:], shift)
    received = jnp.concatenate([bulk.reshape(-1, packed.shape[1]), rest])
    data, labels, task_ids, owner_filled = _unpack(received, outgoing)

    total = collectives.sum(filled).astype(jnp.float32)
    weights = num_devices * owner_filled.astype(jnp.float32) / jnp.maximum(total, 1.0)
    return Representatives(data, labels, task_ids, weights)


def draw_records(buffer: BufferState, key: jax.Array, num: int, on_host: bool = False):
    """`num` records drawn uniformly from this device's filled slots, each with the
    device's fill count (for the weights); and the fill count. `on_host`: the slots are in
    host memory; they are drawn on the device and read by the host."""
    slots, filled = draw_uniform(buffer, key, num)
    read_rows = _host_read_rows if on_host else _read_rows

    def rows(stored: jax.Array) -> jax.Array:
        return read_rows(stored, slots)

    records = (
        {name: rows(stored) for name, stored in buffer.data.items()},
        rows(buffer.labels),
        rows(buffer.task_ids),
        jnp.full(num, filled, _count_dtype(buffer.labels.size)),
    )
    return records, filled


def _pack(tree) -> jax.Array:
    """Row-major leaves [n, ...] as one uint8 array [n, bytes per row]."""
    return jnp.concatenate(
        [
            jax.lax.bitcast_convert_type(leaf, jnp.uint8).reshape(leaf.shape[0], -1)
            for leaf in jax.tree.leaves(tree)
        ],
        axis=1,
    )


def _unpack(packed: jax.Array, template):
    """Inverse of `_pack`, with the shapes and dtypes of `template`'s leaves."""
    leaves, treedef = jax.tree.flatten(template)
    out, start = [], 0
    for leaf in leaves:
        itemsize = leaf.dtype.itemsize
        width = int(np.prod(leaf.shape[1:], dtype=int)) * itemsize
        chunk = packed[:, start : start + width]
        byte_shape = (*leaf.shape[1:], itemsize) if itemsize > 1 else leaf.shape[1:]
        chunk = chunk.reshape(packed.shape[0], *byte_shape)
        out.append(jax.lax.bitcast_convert_type(chunk, leaf.dtype))
        start += width
    return jax.tree.unflatten(treedef, out)


def _count_dtype(capacity: int) -> np.dtype:
    """The smallest unsigned integer type that holds a fill count of up to `capacity`."""
    return next(
        np.dtype(t) for t in (np.uint8, np.uint16, np.uint32) if capacity <= np.iinfo(t).max
    )
