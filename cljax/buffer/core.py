"""The distributed rehearsal buffer as a library of pure functions.

    buffer = rehearsal_buffer(num_classes=10, budget_per_class=20, num_candidates=2,
                              num_representatives=4)
    state = buffer.init({"inputs": jnp.zeros((28, 28, 1), jnp.uint8)})
    state = buffer.insert(state, {"inputs": x, "labels": y}, key)
    representatives = buffer.sample(state, key, shared_key)

Per device the buffer holds `budget_per_class` (N) slots for each class: its partitions are
the classes (`partition='class'`, the paper's). With `partition='stream'` it has one
partition of N slots for every class together, as the DER paper's reservoir over the whole
stream. Each slot stores one sample record: the named tensors of the example given to
`init` (each with its own shape and dtype; uint8 images stay uint8), its label and its task
id. Per partition it counts filled slots and candidates seen.

Per step and per device:
- `insert` adds `num_candidates` (c) samples drawn uniformly from the valid rows of the
  local batch. A candidate goes to a free slot of its partition while there is one. Then
  policy `reservoir` (default) keeps, per partition, a uniform sample of every candidate of
  that partition seen so far on this device: the k-th (0-based) replaces a uniform slot with
  probability N/(k+1). `random_replace` (the reference implementation) always replaces a
  uniform slot of the partition, which favours recent samples. `class_balanced` (GDumb's
  greedy sampler; `partition='stream'` only) stores a candidate in a free slot while there
  is one, else in place of a uniform sample of the class that holds the most slots if its
  own class holds fewer, else not at all: the classes seen share the slots equally.
  `end_of_task` (iCaRL's; `partition='stream'` only) inserts nothing: the strategy fills the
  buffer at each task's end.
  Candidates of one partition in one step are applied as if inserted one after another.
  (Free slots and k < N coincide, except in a buffer re-partitioned onto more devices, whose
  classes are seen more often than they are stored: see `repartition`.)
- `sample` gives every device exactly `r` representatives drawn from the union of all
  devices' buffers, in one round of collectives and with no request: every owner draws r
  samples uniformly from its own filled slots and sends q = r // D of them to every device
  with one `all_to_all`, and its r mod D others to the devices at offsets s, s+1, ...
  (s: a random shift shared by all devices) with one more collective (a ragged all-to-all
  where the backend has one; see `JaxCollectives`). Every device therefore receives
  exactly r samples, and each owner's expected share is r/D. When all devices hold equally
  many samples every filled slot of the global buffer is equally likely. When fills differ,
  a sample from owner i (F_i filled slots, F in total) is drawn with probability 1/(D F_i)
  and carries the importance weight D F_i / F, so that in expectation every filled slot
  weighs the same in the loss; the weight is 1 when fills are equal and 0 when the owner
  holds nothing (an empty slot never reaches the loss).

`init`, `insert` and `sample` work on one device's state. Across D devices, the global
state is every device's state concatenated along axis 0 (`init_sharded`), and `shard_map`
over that axis hands each device its own; `sample` then takes the collectives of the mesh
axis (`cljax.buffer.on_mesh` does all of that for a mesh). With `memory_kind='pinned_host'`
the slots live in host memory: slots to write and to read are chosen on the device, and the
host writes the c candidates and reads the r drawn records, so only those cross between host
and device.
"""

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from cljax.buffer import ops
from cljax.buffer.state import (
    DRAWS,
    LABELS,
    MASK,
    MEMORY_KINDS,
    PARTITIONS,
    POLICIES,
    STREAM_POLICIES,
    TASK_ID,
    BufferState,
    Example,
    RehearsalState,
    Representatives,
)
from cljax.collectives import Collectives, SingleDevice


def rehearsal_buffer(
    num_classes: int,
    budget_per_class: int,
    num_candidates: int,
    num_representatives: int,
    policy: str = "reservoir",
    memory_kind: str = "device",
    partition: str = "class",
    draw: str = "with_replacement",
    draws: int = 1,
) -> "RehearsalBuffer":
    """A rehearsal buffer with these static settings (checked here, once).

    `budget_per_class` is N, the slots of one partition on one device: of each class, or
    with `partition='stream'` of every class together. `sample` makes `draws` independent
    draws of `num_representatives`, each owner drawing its records `draw`.
    """
    for name, value in (
        ("num_classes", num_classes),
        ("budget_per_class", budget_per_class),
        ("num_candidates", num_candidates),
        ("num_representatives", num_representatives),
        ("draws", draws),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not one of {POLICIES}")
    if memory_kind not in MEMORY_KINDS:
        raise ValueError(f"memory_kind={memory_kind!r} is not one of {MEMORY_KINDS}")
    if partition not in PARTITIONS:
        raise ValueError(f"partition={partition!r} is not one of {PARTITIONS}")
    if draw not in DRAWS:
        raise ValueError(f"draw={draw!r} is not one of {DRAWS}")
    if policy in STREAM_POLICIES and (partition, memory_kind) != ("stream", "device"):
        raise ValueError(f"policy={policy!r} needs partition='stream', memory_kind='device'")
    return RehearsalBuffer(
        num_classes,
        budget_per_class,
        num_candidates,
        num_representatives,
        policy,
        memory_kind,
        partition,
        draw,
        draws,
    )


@dataclasses.dataclass(frozen=True)
class RehearsalBuffer:
    """The buffer's static settings and its pure functions (see `rehearsal_buffer`)."""

    num_classes: int
    budget_per_class: int
    num_candidates: int
    num_representatives: int
    policy: str = "reservoir"
    memory_kind: str = "device"
    partition: str = "class"
    draw: str = "with_replacement"
    draws: int = 1

    @property
    def on_host(self) -> bool:
        return self.memory_kind == "pinned_host"

    @property
    def num_partitions(self) -> int:
        """P: the classes, or one partition for the whole stream."""
        return self.num_classes if self.partition == "class" else 1

    def init(self, example: Example) -> BufferState:
        """An empty buffer for one device, storing the named tensors of `example` (one
        sample: arrays or `jax.ShapeDtypeStruct`s, each with its own shape and dtype)."""
        num = self.num_partitions
        slots = (num, self.budget_per_class)
        return BufferState(
            data={
                name: jnp.zeros((*slots, *value.shape), value.dtype)
                for name, value in example.items()
            },
            labels=jnp.broadcast_to(jnp.arange(num, dtype=jnp.int32)[:, None], slots),
            task_ids=jnp.full(slots, -1, jnp.int32),
            counts=jnp.zeros(num, jnp.int32),
            seen=jnp.zeros(num, jnp.int32),
        )

    def empty_representatives(self, example: Example) -> Representatives:
        """The representatives of every draw (`draws` x `num_representatives`), empty (all
        weights 0), for a first step."""
        num = self.draws * self.num_representatives
        return Representatives(
            data={
                name: jnp.zeros((num, *value.shape), value.dtype) for name, value in example.items()
            },
            labels=jnp.zeros(num, jnp.int32),
            task_ids=jnp.full(num, -1, jnp.int32),
            weights=jnp.zeros(num, jnp.float32),
        )

    def insert(
        self, state: BufferState, batch: Mapping[str, jax.Array], key: jax.Array
    ) -> BufferState:
        """Inserts `num_candidates` rows drawn uniformly from the valid rows of `batch`.

        `batch` holds one batch-major tensor for every stored name, `labels` [B], and
        optionally `mask` [B] (False: padding, never inserted) and `task_id` (scalar or [B]).
        """
        if self.policy == "end_of_task":
            return state
        labels = batch[LABELS]
        mask = batch.get(MASK, jnp.ones(labels.shape, bool))
        task_ids = jnp.broadcast_to(jnp.asarray(batch.get(TASK_ID, 0), jnp.int32), labels.shape)
        num_rows = labels.shape[0]
        if self.num_candidates > num_rows:
            raise ValueError(
                f"num_candidates={self.num_candidates} exceeds the {num_rows} rows of the batch"
            )
        bits = jax.random.bits(key, (num_rows + 2 * self.num_candidates,))
        valid_first_in_random_order = jnp.lexsort((bits[:num_rows], ~mask))
        chosen = valid_first_in_random_order[: self.num_candidates]
        valid = mask[chosen]
        classes = labels[chosen]
        partitions = classes if self.partition == "class" else jnp.zeros_like(classes)

        earlier = ops.earlier_in_same_partition(partitions, valid)
        slot_bits = bits[num_rows:].reshape(2, self.num_candidates)
        if self.policy == "class_balanced":
            slot, accepted = ops.balanced_slots(
                state.labels[0], state.counts[0], classes, valid, slot_bits, self.num_classes
            )
        else:
            slot, accepted = ops.choose_slots(
                state.counts[partitions] + earlier,
                state.seen[partitions] + earlier,
                self.budget_per_class,
                slot_bits,
                self.policy,
            )
        target = partitions * self.budget_per_class + slot
        write = valid & accepted & ~ops.overwritten_later(target, valid & accepted)
        target = jnp.where(write, target, self.num_partitions * self.budget_per_class)
        write_rows = ops.host_write_rows if self.on_host else ops.write_rows

        def scatter(stored: jax.Array, values: jax.Array) -> jax.Array:
            return write_rows(stored, target, values)

        arrivals = jnp.zeros_like(state.seen).at[partitions].add(valid.astype(jnp.int32))
        return BufferState(
            data={
                name: scatter(stored, batch[name][chosen]) for name, stored in state.data.items()
            },
            labels=scatter(state.labels, classes),
            task_ids=scatter(state.task_ids, task_ids[chosen]),
            counts=jnp.minimum(state.counts + arrivals, self.budget_per_class),
            seen=state.seen + arrivals,
        )

    def sample(
        self,
        state: BufferState,
        key: jax.Array,
        shared_key: jax.Array,
        collectives: Collectives = SingleDevice(),  # noqa: B008 (stateless)
    ) -> Representatives:
        """`num_representatives` samples from the union of all devices' buffers (see the
        module docstring), for each of `draws` independent draws, one after the other.

        `key` must differ between devices and `shared_key` must be the same on all of them.
        Each record travels as one row of bytes, so a draw costs two all-to-alls whatever the
        number of stored tensors and whatever D, and a sum of fill counts where r < D or
        records are drawn without replacement.
        """
        if self.draws == 1:
            return self._draw(state, key, shared_key, collectives)
        keys, shared_keys = (
            jax.random.split(key, self.draws),
            jax.random.split(shared_key, self.draws),
        )
        draws = [
            self._draw(state, own, shared, collectives)
            for own, shared in zip(keys, shared_keys, strict=True)
        ]
        return jax.tree.map(lambda *parts: jnp.concatenate(parts), *draws)

    def _draw(self, state, key, shared_key, collectives: Collectives) -> Representatives:
        """One draw of `num_representatives` from the global buffer."""
        num, num_devices = self.num_representatives, collectives.num_devices()
        bulk_rows = num // num_devices * num_devices
        outgoing, filled = self._draw_records(state, key)
        packed = ops.pack(outgoing)
        bulk = collectives.all_to_all(packed[:bulk_rows].reshape(num_devices, -1, packed.shape[1]))
        shift = ops.integers_below(jax.random.bits(shared_key, (2,)), num_devices)
        rest = collectives.receive_shifted(packed[bulk_rows:], shift)
        received = jnp.concatenate([bulk.reshape(-1, packed.shape[1]), rest])
        data, labels, task_ids, owner_filled = ops.unpack(received, outgoing)

        if bulk_rows and self.draw == "with_replacement":
            # Every owner sent this device r // D records, each carrying its fill count: their
            # sum over owners is the global fill, and needs no collective of its own. (A
            # record drawn without replacement may be invalid, carrying a count of 0.)
            fills = owner_filled[:bulk_rows].reshape(num_devices, -1)[:, 0]
            total = fills.astype(filled.dtype).sum()
        else:
            total = collectives.sum(filled)
        total = total.astype(jnp.float32)
        weights = num_devices * owner_filled.astype(jnp.float32) / jnp.maximum(total, 1.0)
        return Representatives(data, labels, task_ids, weights)

    def _draw_records(self, state: BufferState, key: jax.Array):
        """`num_representatives` records drawn uniformly from this device's filled slots
        (`draw`), each with the device's fill count (for the weights; 0 for an invalid
        draw, which then weighs 0); and the fill count."""
        num = self.num_representatives
        if self.draw == "with_replacement":
            slots, filled = ops.draw_uniform(state, key, num)
            carried = jnp.full(num, filled)
        else:
            slots, valid, filled = ops.draw_distinct(state, key, num)
            carried = jnp.where(valid, filled, 0)
        read_rows = ops.host_read_rows if self.on_host else ops.read_rows

        def rows(stored: jax.Array) -> jax.Array:
            return read_rows(stored, slots)

        records = (
            {name: rows(stored) for name, stored in state.data.items()},
            rows(state.labels),
            rows(state.task_ids),
            carried.astype(ops.count_dtype(state.labels.size)),
        )
        return records, filled

    def shardings(self, sharding: NamedSharding) -> BufferState:
        """Where a global buffer split by `sharding` lives: its slots in `memory_kind`, its
        per-class counters on the devices."""
        slots = sharding.with_memory_kind(self.memory_kind)
        return BufferState(slots, slots, slots, sharding, sharding)

    def init_sharded(self, example: Example, sharding: NamedSharding) -> BufferState:
        """The global empty buffer: one `init(example)` per device, split by `sharding`."""
        return _per_device_copies(lambda: self.init(example), sharding, self.shardings(sharding))

    def empty_representatives_sharded(
        self, example: Example, sharding: NamedSharding
    ) -> Representatives:
        """The global `empty_representatives(example)`: one per device, split by `sharding`."""
        return _per_device_copies(lambda: self.empty_representatives(example), sharding, sharding)

    def rehearsal_shardings(self, sharding: NamedSharding) -> RehearsalState:
        """Where a train step's rehearsal state split by `sharding` lives."""
        return RehearsalState(self.shardings(sharding), sharding)

    def init_rehearsal(self, example: Example, sharding: NamedSharding) -> RehearsalState:
        """A train step's first rehearsal state: every device's empty buffer and empty
        representatives, split by `sharding`."""
        return RehearsalState(
            self.init_sharded(example, sharding),
            self.empty_representatives_sharded(example, sharding),
        )


def record_bytes(example: Example) -> int:
    """Bytes of one stored sample: its tensors, label and task id."""
    tensors = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in example.values())
    return tensors + 2 * np.dtype(np.int32).itemsize


def _per_device_copies(make_local: Callable, sharding: NamedSharding, out_shardings):
    """`make_local()` once per device along the sharded axis, concatenated along axis 0."""
    num_shards = sharding.mesh.shape[sharding.spec[0]]

    def tiled():
        return jax.tree.map(
            lambda leaf: jnp.tile(leaf, (num_shards,) + (1,) * (leaf.ndim - 1)), make_local()
        )

    return jax.jit(tiled, out_shardings=out_shardings)()
