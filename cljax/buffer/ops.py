"""The buffer's operations on slots and records, under its functions in `core`: which slot a
candidate takes, which slots a draw reads, reading and writing rows (on the device, or by the
host in host memory), random integers below a bound, and records packed into rows of bytes
for the exchange between devices."""

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compute_on import compute_on

from cljax.buffer.state import BufferState


def write_rows(stored: jax.Array, target: jax.Array, values: jax.Array) -> jax.Array:
    """`stored` [C, N, ...] with flat slots `target` set to `values` (out of range: dropped)."""
    flat = stored.reshape(-1, *stored.shape[2:])
    return flat.at[target].set(values, mode="drop").reshape(stored.shape)


def read_rows(stored: jax.Array, slots: jax.Array) -> jax.Array:
    """Rows of `stored` [C, N, ...] at flat slots `slots`."""
    return stored.reshape(-1, *stored.shape[2:])[slots]


def _on_host(function: Callable) -> Callable:
    """`function`, jitted, run by the host, its outputs left in host memory.

    From JAX 0.11 on, `compute_on` wraps the function and names the outputs' memory; before,
    it is a context manager that only sets where the computation runs.
    """
    if "out_memory_spaces" in inspect.signature(compute_on).parameters:
        return compute_on(
            jax.jit(function), compute_type="device_host", out_memory_spaces=jax.memory.Space.Host
        )
    return compute_on("device_host")(jax.jit(function))


def host_write_rows(stored: jax.Array, target: jax.Array, values: jax.Array) -> jax.Array:
    """`write_rows` run by the host on slots in host memory."""
    host = jax.memory.Space.Host
    write = _on_host(write_rows)
    return write(stored, jax.device_put(target, host), jax.device_put(values, host))


def host_read_rows(stored: jax.Array, slots: jax.Array) -> jax.Array:
    """`read_rows` run by the host on slots in host memory; the rows go to the device."""
    rows = _on_host(read_rows)(stored, jax.device_put(slots, jax.memory.Space.Host))
    return jax.device_put(rows, jax.memory.Space.Device)


def earlier_in_same_partition(partitions: jax.Array, valid: jax.Array) -> jax.Array:
    """How many valid candidates of each candidate's partition come before it in this step."""
    same = (partitions[:, None] == partitions[None, :]) & valid[None, :]
    return jnp.tril(same, k=-1).sum(axis=1)


def choose_slots(
    free_slot: jax.Array, position: jax.Array, budget: int, bits: jax.Array, policy: str
) -> tuple[jax.Array, jax.Array]:
    """Slot per candidate and whether it is stored: the class's next free slot while
    `free_slot` < `budget`, then by policy from `position`, the candidate's 0-based index
    among all candidates of its class so far (`bits`: two random words per candidate)."""
    replaced = integers_below(bits, position + 1 if policy == "reservoir" else budget)
    slot = jnp.where(free_slot < budget, free_slot, replaced)
    return slot, slot < budget


def balanced_slots(
    labels: jax.Array,
    count: jax.Array,
    classes: jax.Array,
    valid: jax.Array,
    bits: jax.Array,
    num_classes: int,
) -> tuple[jax.Array, jax.Array]:
    """GDumb's greedy class-balanced choice for one partition's slots (`labels` [N], the
    first `count` filled): slot per candidate and whether it is stored, the candidates taken
    one after another. A candidate takes the next free slot, else a uniform slot of the
    class that holds the most (the lowest such class) if its own holds fewer, else none."""
    budget = labels.shape[0]

    def place(carry, candidate):
        labels, count = carry
        label, is_valid, words = candidate
        filled = jnp.arange(budget) < count
        held = jnp.zeros(num_classes, jnp.int32).at[labels].add(filled.astype(jnp.int32))
        largest = jnp.argmax(held)
        of_largest = filled & (labels == largest)
        rank = integers_below(words, jnp.maximum(held[largest], 1))
        victim = jnp.argmax(jnp.cumsum(of_largest) > rank)
        free = count < budget
        stored = is_valid & (free | (held[label] < held[largest]))
        slot = jnp.where(free, count, victim)
        labels = jnp.where(stored, labels.at[slot].set(label), labels)
        return (labels, count + (stored & free)), (slot, stored)

    _, (slots, stored) = jax.lax.scan(place, (labels, count), (classes, valid, bits.T))
    return slots, stored


def overwritten_later(target: jax.Array, writes: jax.Array) -> jax.Array:
    """True where a later candidate writes the same slot (sequential semantics)."""
    same_target = (target[:, None] == target[None, :]) & writes[None, :]
    return jnp.triu(same_target, k=1).any(axis=1)


def draw_uniform(state: BufferState, key: jax.Array, num: int) -> tuple[jax.Array, jax.Array]:
    """`num` draws (with replacement) from this device's filled slots, as flat slot ids.

    Returns the slot ids and this device's number of filled slots; the ids are meaningless
    when nothing is filled.
    """
    filled = state.counts.sum()
    rank = integers_below(jax.random.bits(key, (2, num)), jnp.maximum(filled, 1))
    return _slots_of_ranks(state, rank), filled


def draw_distinct(
    state: BufferState, key: jax.Array, num: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`num` draws without replacement from this device's filled slots, in random order (all
    of them while fewer than `num` are filled, the other draws invalid), as flat slot ids.

    Returns the slot ids, which draws are valid, and this device's number of filled slots.
    Floyd's algorithm picks a uniform subset of the ranks [0, filled) with `num` random
    integers, whatever the buffer's size; a random sort of the draws then orders it.
    """
    filled = state.counts.sum()
    bits = jax.random.bits(key, (3, num))

    def pick(chosen, inputs):
        position, word = inputs
        top = filled - num + position  # the candidates are the ranks 0..top
        drawn = integers_below(word, jnp.maximum(top + 1, 1))
        rank = jnp.where((chosen == drawn).any(), top, drawn)
        return chosen.at[position].set(jnp.where(top < 0, -1, rank)), None

    start = jnp.full(num, -1, jnp.int32) + jnp.zeros_like(filled)  # varies as `filled` does
    ranks, _ = jax.lax.scan(pick, start, (jnp.arange(num), bits[:2].T.reshape(num, 2)))
    ranks = ranks[jnp.argsort(bits[2])]
    return _slots_of_ranks(state, jnp.maximum(ranks, 0)), ranks >= 0, filled


def _slots_of_ranks(state: BufferState, rank: jax.Array) -> jax.Array:
    """The flat slot ids of the filled slots of ranks `rank` (partition by partition)."""
    num_partitions = state.counts.shape[0]
    budget = state.labels.shape[1]
    ends = jnp.cumsum(state.counts)
    # One comparison per partition and draw: a single fused op, where a binary search is a loop.
    found = jnp.searchsorted(ends, rank, side="right", method="compare_all")
    partitions = jnp.minimum(found, num_partitions - 1)
    offset = rank - (ends[partitions] - state.counts[partitions])
    return partitions * budget + offset


def integers_below(bits: jax.Array, bound: jax.Array | int) -> jax.Array:
    """Integers uniform in [0, `bound`) (int32, `bound` >= 1) from random `bits` [2, ...]
    (uint32): floor(x * bound / 2^64) for the 64-bit x each pair of words makes, so each
    value's probability is 1/bound up to a relative error below bound / 2^64.

    The buffer draws each step's random bits with one `jax.random.bits` call per key and
    maps them here: every `jax.random` call is a loop of its own on XLA:CPU, and
    `jax.random.randint` makes three.
    """
    high, low = bits
    bound = jnp.asarray(bound, jnp.uint32)
    low_part = high * bound
    carry = (low_part + _high_word_of_product(low, bound)) < low_part
    return (_high_word_of_product(high, bound) + carry).astype(jnp.int32)


def _high_word_of_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """The upper 32 bits of the 64-bit product of uint32 `a` and `b`, from 16-bit halves
    (`lax.mulhi` fails to lower inside `shard_map` in JAX 0.10)."""
    a_high, a_low, b_high, b_low = a >> 16, a & 0xFFFF, b >> 16, b & 0xFFFF
    cross_ab, cross_ba = a_high * b_low, a_low * b_high
    middle = ((a_low * b_low) >> 16) + (cross_ab & 0xFFFF) + (cross_ba & 0xFFFF)
    return a_high * b_high + (cross_ab >> 16) + (cross_ba >> 16) + (middle >> 16)


def pack(tree) -> jax.Array:
    """Row-major leaves [n, ...] as one uint8 array [n, bytes per row]."""
    return jnp.concatenate(
        [
            jax.lax.bitcast_convert_type(leaf, jnp.uint8).reshape(leaf.shape[0], -1)
            for leaf in jax.tree.leaves(tree)
        ],
        axis=1,
    )


def unpack(packed: jax.Array, template):
    """Inverse of `pack`, with the shapes and dtypes of `template`'s leaves."""
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


def count_dtype(capacity: int) -> np.dtype:
    """The smallest unsigned integer type that holds a fill count of up to `capacity`."""
    return next(
        np.dtype(t) for t in (np.uint8, np.uint16, np.uint32) if capacity <= np.iinfo(t).max
    )
