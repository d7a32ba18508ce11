"""Properties of the rehearsal buffer, with samples that encode their own id.

Every sample's input is the int32 row [id, label, task], so any misplaced input, label or
task id is caught. Statistical tests use fixed seeds and reject at p < 1e-4.
"""

import functools
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from cljax import buffer as buffer_lib
from cljax.buffer import ops as buffer_ops
from cljax.collectives import (
    AXIS,
    JaxCollectives,
    SingleDevice,
    received_bytes,
    shifted_plan,
    sub_jaxprs,
)

ID, LABEL, TASK = 0, 1, 2
P_VALUE_FLOOR = 1e-4


def id_batch(ids: np.ndarray, labels: np.ndarray, task: int) -> np.ndarray:
    """Inputs that carry their own id, label and task."""
    return np.stack([ids, labels, np.full_like(ids, task)], axis=-1).astype(np.int32)


EXAMPLE = {"inputs": jax.ShapeDtypeStruct((3,), np.dtype(np.int32))}


def make_buffer(num_classes: int, budget: int, num_candidates: int = 1, num_reps: int = 1, **kw):
    return buffer_lib.rehearsal_buffer(num_classes, budget, num_candidates, num_reps, **kw)


@functools.partial(jax.jit, static_argnames=("buffer",))
def insert(buffer, state, inputs, mask, task, key):
    batch = {"inputs": inputs, "labels": inputs[:, LABEL], "mask": mask, "task_id": task}
    return buffer.insert(state, batch, key)


def per_device_view(state, num_devices: int):
    """A global buffer state with a leading device axis: [D, C, ...] from [D * C, ...]."""
    return jax.tree.map(
        lambda leaf: np.asarray(leaf).reshape(num_devices, -1, *leaf.shape[1:]), state
    )


def filled_slots(buffer: buffer_lib.BufferState) -> np.ndarray:
    """Boolean [C, N]: slot n of class c is filled iff n < counts[c]."""
    budget = buffer.labels.shape[-1]
    return np.arange(budget)[None, :] < np.asarray(buffer.counts)[:, None]


class TestInsert:
    num_classes, budget, batch = 4, 5, 16

    def stream(self, seed: int, steps: int):
        """Batches with skewed class frequencies and a few masked rows."""
        rng = np.random.default_rng(seed)
        for step in range(steps):
            ids = np.arange(self.batch) + step * self.batch
            labels = rng.choice(self.num_classes, self.batch, p=[0.55, 0.3, 0.1, 0.05])
            mask = rng.random(self.batch) > 0.2
            yield step, id_batch(ids, labels, task=step % 3), mask

    def test_counts_stay_within_budget_and_equal_min_seen_budget(self):
        buffer = make_buffer(self.num_classes, self.budget, num_candidates=6)
        state = buffer.init(EXAMPLE)
        key = jax.random.key(0)
        candidates_so_far = 0
        for step, inputs, mask in self.stream(seed=1, steps=40):
            state = insert(buffer, state, inputs, mask, step % 3, jax.random.fold_in(key, step))
            candidates_so_far += min(6, mask.sum())
            counts, seen = np.asarray(state.counts), np.asarray(state.seen)
            assert (counts <= self.budget).all()
            np.testing.assert_array_equal(counts, np.minimum(seen, self.budget))
            assert seen.sum() == candidates_so_far

    def test_free_slots_fill_before_any_replacement(self):
        """With every valid row a candidate, a class seen <= N times keeps all it saw."""
        buffer = make_buffer(self.num_classes, self.budget, num_candidates=self.batch)
        state = buffer.init(EXAMPLE)
        seen_ids = {c: [] for c in range(self.num_classes)}
        for step, inputs, mask in self.stream(seed=2, steps=12):
            state = insert(buffer, state, inputs, mask, 0, jax.random.key(step))
            for row in inputs[mask]:
                seen_ids[row[LABEL]].append(row[ID])
            stored = np.asarray(state.data["inputs"])[..., ID]
            for c in range(self.num_classes):
                kept = set(stored[c, : state.counts[c]].tolist())
                if len(seen_ids[c]) <= self.budget:
                    assert kept == set(seen_ids[c])
                else:
                    assert kept <= set(seen_ids[c]) and len(kept) == self.budget

    def test_free_slots_left_by_repartition_fill_first_and_count_only_what_was_written(self):
        """A class seen 12 times but holding 1 sample (as after resuming on more devices):
        its next candidates go to the free slots, and the count grows by what was written."""
        buffer = make_buffer(1, self.budget, num_candidates=2)
        empty = buffer.init(EXAMPLE)
        state = buffer_lib.BufferState(
            data={"inputs": empty.data["inputs"].at[0, 0].set(jnp.array([100, 0, 0]))},
            labels=empty.labels,
            task_ids=empty.task_ids.at[0, 0].set(0),
            counts=jnp.array([1], jnp.int32),
            seen=jnp.array([12], jnp.int32),
        )
        inputs = id_batch(np.array([200, 201]), np.array([0, 0]), task=1)
        state = insert(buffer, state, inputs, np.ones(2, bool), 1, jax.random.key(0))
        assert state.counts.tolist() == [3] and state.seen.tolist() == [14]
        stored = np.asarray(state.data["inputs"])[0, :3, ID]
        assert sorted(stored.tolist()) == [100, 200, 201]
        assert state.task_ids[0].tolist() == [0, 1, 1, -1, -1]

    def test_stored_samples_stay_aligned_and_masked_rows_never_enter(self):
        buffer = make_buffer(self.num_classes, self.budget, num_candidates=5)
        state = buffer.init(EXAMPLE)
        valid_ids = set()
        for step, inputs, mask in self.stream(seed=3, steps=30):
            state = insert(buffer, state, inputs, mask, step % 3, jax.random.key(step))
            valid_ids |= set(inputs[mask, ID].tolist())
        filled = filled_slots(state)
        stored = np.asarray(state.data["inputs"])[filled]
        assert set(stored[:, ID].tolist()) <= valid_ids
        assert len(set(stored[:, ID].tolist())) == len(stored)
        np.testing.assert_array_equal(stored[:, LABEL], np.asarray(state.labels)[filled])
        np.testing.assert_array_equal(stored[:, TASK], np.asarray(state.task_ids)[filled])
        class_of_slot = np.broadcast_to(np.arange(self.num_classes)[:, None], filled.shape)
        np.testing.assert_array_equal(stored[:, LABEL], class_of_slot[filled])


def retention_counts(policy: str, trials: int, budget: int, length: int, per_step: int):
    """How often each position of a one-class stream is still stored at its end."""

    buffer = make_buffer(1, budget, num_candidates=per_step, policy=policy)

    def one_trial(key):
        state = buffer.init(EXAMPLE)
        for step in range(length // per_step):
            ids = jnp.arange(per_step) + step * per_step
            inputs = jnp.stack([ids, jnp.zeros_like(ids), jnp.zeros_like(ids)], -1)
            batch = {"inputs": inputs, "labels": inputs[:, LABEL]}
            state = buffer.insert(state, batch, jax.random.fold_in(key, step))
        return state.data["inputs"][0, :, ID]

    kept = jax.jit(jax.vmap(one_trial))(jax.random.split(jax.random.key(7), trials))
    return np.bincount(np.asarray(kept).ravel(), minlength=length)


class TestPolicies:
    trials, budget, length, per_step = 4000, 5, 40, 4

    def test_reservoir_keeps_each_position_with_probability_budget_over_seen(self):
        counts = retention_counts("reservoir", self.trials, self.budget, self.length, self.per_step)
        assert counts.sum() == self.trials * self.budget
        assert stats.chisquare(counts).pvalue > P_VALUE_FLOOR

    def test_random_replace_favours_recent_samples(self):
        counts = retention_counts(
            "random_replace", self.trials, self.budget, self.length, self.per_step
        )
        assert stats.chisquare(counts).pvalue < P_VALUE_FLOOR
        assert counts[-self.per_step :].sum() > 3 * counts[: self.per_step].sum()


def global_buffer(mesh, fills_per_device: list[int], num_classes: int, budget: int):
    """A sharded buffer where device d inserted `fills_per_device[d]` id-carrying samples
    with ids d * 12 + row."""
    num_devices = mesh.devices.size
    width = 12
    ids = np.arange(num_devices * width).reshape(num_devices, width)
    labels = ids % num_classes
    mask = np.arange(width)[None, :] < np.asarray(fills_per_device)[:, None]
    inputs = id_batch(ids.ravel(), labels.ravel(), task=0)
    buffer = make_buffer(num_classes, budget, num_candidates=width)

    def per_device(state, inputs, mask):
        batch = {"inputs": inputs, "labels": inputs[:, LABEL], "mask": mask}
        return buffer.insert(state, batch, jax.random.key(0))

    state = buffer.init_sharded(EXAMPLE, NamedSharding(mesh, P(AXIS)))
    shard = jax.shard_map(per_device, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
    return jax.jit(shard)(state, inputs, mask.ravel())


def draw_rounds(
    mesh, state, num: int, rounds: int, collectives: JaxCollectives | None = None
) -> buffer_lib.Representatives:
    """`rounds` independent calls of `sample`; leaves [rounds, D * num, ...]."""
    budget = state.labels.shape[-1]
    buffer = make_buffer(state.labels.shape[0] // mesh.devices.size, budget, num_reps=num)
    collectives = collectives or JaxCollectives()

    def per_device(state, key):
        device_key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
        return buffer.sample(state, device_key, key, collectives)

    shard = jax.shard_map(per_device, mesh=mesh, in_specs=(P(AXIS), P()), out_specs=P(AXIS))
    keys = jax.random.split(jax.random.key(11), rounds)
    return jax.jit(jax.vmap(shard, in_axes=(None, 0)))(state, keys)


def submesh(num_devices: int) -> Mesh:
    return Mesh(np.asarray(jax.devices()[:num_devices]), (AXIS,))


def filled_ids(state) -> set[int]:
    budget = state.labels.shape[-1]
    filled = np.asarray(state.counts)[..., None] > np.arange(budget)
    return set(np.asarray(state.data["inputs"])[filled][:, ID].tolist())


def owners_of(reps, width: int) -> np.ndarray:
    """The device that stored each representative (ids are device * width + row)."""
    return np.asarray(reps.data["inputs"])[..., ID] // width


class TestGlobalSampling:
    num_classes, budget = 3, 4
    width = 12

    @pytest.mark.parametrize("num", [8, 3, 20])
    def test_every_device_receives_exactly_r_and_only_filled_slots(self, mesh, num):
        fills = [0, 1, 2, 5, 12, 0, 3, 7]
        buffer = global_buffer(mesh, fills, self.num_classes, self.budget)
        reps = draw_rounds(mesh, buffer, num, rounds=50)
        weights = np.asarray(reps.weights)
        assert weights.shape == (50, mesh.devices.size * num)
        ids = np.asarray(reps.data["inputs"])[..., ID]
        assert set(ids[weights > 0].tolist()) <= filled_ids(buffer)
        for field in (reps.labels, reps.task_ids):
            np.testing.assert_array_equal(
                np.asarray(field)[weights > 0],
                np.asarray(reps.data["inputs"])[..., LABEL if field is reps.labels else TASK][
                    weights > 0
                ],
            )
        empty_owner = np.isin(owners_of(reps, self.width), [0, 5])
        assert (weights[empty_owner] == 0).all() and (weights[~empty_owner] > 0).all()

    def test_empty_global_buffer_gives_only_zero_weights(self, mesh):
        buffer = global_buffer(mesh, [0] * 8, self.num_classes, self.budget)
        reps = draw_rounds(mesh, buffer, 8, rounds=3)
        assert (np.asarray(reps.weights) == 0).all()

    @pytest.mark.parametrize(("num_devices", "num"), [(1, 8), (8, 8), (8, 3), (8, 20)])
    def test_equal_fills_give_every_global_slot_equal_probability(self, num_devices, num):
        mesh = submesh(num_devices)
        buffer = global_buffer(mesh, [self.width] * num_devices, self.num_classes, self.budget)
        reps = draw_rounds(mesh, buffer, num, rounds=1600 // num)
        np.testing.assert_array_equal(np.asarray(reps.weights), 1.0)
        ids = np.asarray(reps.data["inputs"])[..., ID].ravel()
        counts = np.bincount(ids, minlength=num_devices * self.width)
        assert stats.chisquare(counts).pvalue > P_VALUE_FLOOR

    @pytest.mark.parametrize("num", [3, 20])
    def test_each_receiver_draws_every_owner_equally_often(self, mesh, num):
        """With r not a multiple of D, the random shift spreads the extra draws evenly."""
        buffer = global_buffer(mesh, [self.width] * 8, self.num_classes, self.budget)
        rounds = 400
        owners = owners_of(draw_rounds(mesh, buffer, num, rounds), self.width)
        for receiver in range(8):
            mine = owners[:, receiver * num : (receiver + 1) * num].ravel()
            assert stats.chisquare(np.bincount(mine, minlength=8)).pvalue > P_VALUE_FLOOR

    def test_unequal_fills_draw_owners_uniformly_and_weight_by_fill(self, mesh):
        """Owner i's slots are drawn with probability 1/(D F_i) and weighted D F_i / F_total,
        so that the weighted share of every filled slot is 1 / F_total."""
        fills = np.asarray([1, 2, 3, 4, 6, 8, 10, 12])
        buffer = global_buffer(mesh, fills.tolist(), self.num_classes, self.budget)
        reps = draw_rounds(mesh, buffer, 16, rounds=100)
        ids = np.asarray(reps.data["inputs"])[..., ID].ravel()
        owner = ids // self.width
        np.testing.assert_allclose(
            np.asarray(reps.weights).ravel(), 8 * fills[owner] / fills.sum(), rtol=1e-6
        )
        present = np.concatenate([d * self.width + np.arange(f) for d, f in enumerate(fills)])
        observed = np.bincount(ids, minlength=8 * self.width)[present]
        expected = len(ids) / (8 * fills[present // self.width])
        assert stats.chisquare(observed, expected).pvalue > P_VALUE_FLOOR

    def test_same_keys_give_identical_representatives(self, mesh):
        buffer = global_buffer(mesh, [5, 1, 12, 3, 0, 7, 2, 9], self.num_classes, self.budget)
        first, second = (draw_rounds(mesh, buffer, 5, rounds=4) for _ in range(2))
        jax.tree.map(np.testing.assert_array_equal, first, second)


class EmulatedRagged(JaxCollectives):
    """`ragged_all_to_all` by its documented semantics, built from an `all_gather`, so that
    the ragged exchange runs on a CPU, whose XLA has no ragged all-to-all."""

    def __init__(self):
        super().__init__(ragged=True)

    def ragged_all_to_all(
        self, operand, output, input_offsets, send_sizes, output_offsets, recv_sizes
    ):
        gathered = jax.lax.all_gather(
            (operand, input_offsets, send_sizes, output_offsets), self.axis_name
        )
        operands, starts, sizes, destinations = gathered
        me, rows = self.device_index(), jnp.arange(operand.shape[0])
        start, size, destination = (
            starts[:, me, None],
            sizes[:, me, None],
            destinations[:, me, None],
        )
        senders = jnp.arange(operands.shape[0])[:, None]
        sent = operands[senders, jnp.minimum(start + rows, operand.shape[0] - 1)]
        targets = jnp.where(rows < size, destination + rows, output.shape[0])
        return output.at[targets.ravel()].set(sent.reshape(-1, *sent.shape[2:]), mode="drop")


class TestRaggedExchange:
    """The ragged exchange (GPU, TPU) against the padded one (CPU, MPI)."""

    @pytest.mark.parametrize("num", [3, 7, 20])
    def test_gives_the_padded_exchanges_representatives_bit_for_bit(self, mesh, num):
        buffer = global_buffer(mesh, [5, 1, 12, 3, 0, 7, 2, 9], 3, 4)
        padded = draw_rounds(mesh, buffer, num, 20, JaxCollectives(ragged=False))
        ragged = draw_rounds(mesh, buffer, num, 20, EmulatedRagged())
        jax.tree.map(np.testing.assert_array_equal, padded, ragged)

    @pytest.mark.parametrize("num_devices", [2, 5, 8, 64])
    def test_plan_sends_row_t_to_the_receiver_that_expects_it(self, num_devices):
        """For every shift s and k < D rows: sender i's row t lands as row t of receiver
        (i - s - t) mod D, each receiver gets k rows, and both ends agree on the sizes."""
        devices = np.arange(num_devices)
        shift, sender, receiver = devices[:, None, None], devices[None, :, None], devices
        for num_rows in range(num_devices):

            def plan(index, shift, num_rows=num_rows):
                return shifted_plan(index, shift, num_devices, num_rows)

            by_shift = jax.vmap(jax.vmap(plan, (0, None)), (None, 0))(devices, devices)
            offsets, sizes, destinations, recv_sizes = map(np.asarray, by_shift)
            np.testing.assert_array_equal(sizes, recv_sizes.transpose(0, 2, 1))
            np.testing.assert_array_equal(sizes.sum(axis=1), num_rows)
            np.testing.assert_array_equal(sizes.sum(axis=2), num_rows)
            np.testing.assert_array_equal(destinations, offsets)
            owner = (receiver + shift + offsets) % num_devices
            assert (owner == sender)[sizes > 0].all()

    @pytest.mark.parametrize("num_devices", [2, 8])
    def test_program_holds_one_collective_for_the_leftover_rows(self, num_devices):
        mesh = submesh(num_devices)
        buffer = make_buffer(10, 100, num_reps=7)
        state = buffer.init_sharded(EXAMPLE, NamedSharding(mesh, P(AXIS)))
        primitives = {}
        for ragged in (False, True):

            def per_device(state, key, ragged=ragged):
                return buffer.sample(state, key, key, JaxCollectives(ragged=ragged))

            shard = jax.shard_map(per_device, mesh=mesh, in_specs=(P(AXIS), P()), out_specs=P(AXIS))
            jaxpr = jax.make_jaxpr(shard)(state, jax.random.key(0)).jaxpr
            primitives[ragged] = collective_counts(jaxpr)
        assert primitives[True] == {"all_to_all": 1, "ragged_all_to_all": 1}
        assert primitives[False] == {"all_to_all": 2}


def collective_counts(jaxpr) -> dict[str, int]:
    """How often each collective primitive appears in `jaxpr` and its sub-jaxprs."""
    counts: dict[str, int] = {}
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("all_to_all", "ragged_all_to_all", "ppermute"):
            counts[name] = counts.get(name, 0) + 1
        for sub in sub_jaxprs(eqn):
            for inner, count in collective_counts(sub).items():
                counts[inner] = counts.get(inner, 0) + count
    return counts


def test_sharded_insertion_equals_a_single_device_loop(mesh):
    """Each device's shard is what one device alone builds from the same rows and keys."""
    num_devices, batch, steps = 8, 6, 5
    rng = np.random.default_rng(0)
    batches = [
        id_batch(np.arange(num_devices * batch) + step * 1000, rng.integers(0, 3, 48), step)
        for step in range(steps)
    ]
    masks = [rng.random(num_devices * batch) > 0.3 for _ in range(steps)]

    buffer = make_buffer(3, 2, num_candidates=4)

    def per_device(state, inputs, mask, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
        return buffer.insert(
            state, {"inputs": inputs, "labels": inputs[:, LABEL], "mask": mask}, key
        )

    shard = jax.jit(
        jax.shard_map(
            per_device, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(AXIS), P()), out_specs=P(AXIS)
        )
    )
    sharded_state = buffer.init_sharded(EXAMPLE, NamedSharding(mesh, P(AXIS)))
    for step in range(steps):
        sharded_state = shard(sharded_state, batches[step], masks[step], jax.random.key(step))

    by_device = per_device_view(sharded_state, num_devices)
    for device in range(num_devices):
        alone = buffer.init(EXAMPLE)
        rows = slice(device * batch, (device + 1) * batch)
        for step in range(steps):
            key = jax.random.fold_in(jax.random.key(step), device)
            alone = insert(buffer, alone, batches[step][rows], masks[step][rows], 0, key)
        jax.tree.map(
            lambda a, b, d=device: np.testing.assert_array_equal(a[d], b), by_device, alone
        )


def test_every_stored_tensor_stays_with_its_sample():
    """Inputs, an extra multi-dimensional target, logits, label and task id all move together."""
    example = {
        "inputs": np.zeros(3, np.int32),
        "target": np.zeros((2, 2), np.float16),
        "logits": jax.ShapeDtypeStruct((3,), np.dtype(np.float32)),
    }
    buffer = make_buffer(3, 4, num_candidates=5)
    state = buffer.init(example)
    assert state.data["target"].dtype == jnp.float16
    rng = np.random.default_rng(5)
    for step in range(20):
        ids = np.arange(8) + 8 * step
        inputs = id_batch(ids, rng.integers(0, 3, 8), task=step)
        samples = {
            "inputs": inputs,
            "target": np.broadcast_to(ids[:, None, None] / 4, (8, 2, 2)).astype(np.float16),
            "logits": (ids[:, None] * np.arange(1, 4)).astype(np.float32),
        }
        batch = {**samples, "labels": inputs[:, LABEL], "task_id": step}
        state = buffer.insert(state, batch, jax.random.key(step))
    filled = filled_slots(state)
    ids = np.asarray(state.data["inputs"])[filled][:, ID]
    np.testing.assert_array_equal(np.asarray(state.data["target"])[filled][:, 1, 1], ids / 4)
    np.testing.assert_array_equal(np.asarray(state.data["logits"])[filled][:, 2], ids * 3)
    np.testing.assert_array_equal(np.asarray(state.task_ids)[filled], ids // 8)


@pytest.mark.parametrize("num", [4, 7, 64])
def test_bytes_received_per_step_stay_within_ten_percent_of_the_rows_exchanged(num):
    """Measured from the collectives in the traced program, for 1 to 8 devices: r records
    with the ragged exchange; with the padded one, one record from every device for the
    r mod D leftovers."""
    example = {
        "inputs": jax.ShapeDtypeStruct((8, 8, 1), np.dtype(np.uint8)),
        "logits": jax.ShapeDtypeStruct((10,), np.dtype(np.float32)),
    }
    record = buffer_lib.record_bytes(example)
    for num_devices in (1, 2, 4, 8):
        padded_rows = num - num % num_devices + (num_devices if num % num_devices else 0)
        for ragged, rows in ((True, num), (False, padded_rows)):
            collectives = JaxCollectives(ragged=ragged)
            received = sampling_received_bytes(submesh(num_devices), example, num, collectives)
            assert rows * record <= received <= 1.1 * rows * record


def sampling_received_bytes(mesh, example, num: int, collectives: JaxCollectives) -> int:
    buffer = make_buffer(10, 1000, num_reps=num)
    state = buffer.init_sharded(example, NamedSharding(mesh, P(AXIS)))

    def per_device(state, key):
        return buffer.sample(state, key, key, collectives)

    shard = jax.shard_map(per_device, mesh=mesh, in_specs=(P(AXIS), P()), out_specs=P(AXIS))
    return received_bytes(jax.make_jaxpr(shard)(state, jax.random.key(0)).jaxpr)


def test_integers_below_is_the_64_bit_word_times_the_bound_over_two_to_the_64():
    """Exact against Python integers, carries included (all-ones words)."""
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, (2, 2000), dtype=np.uint64)
    words[:, :50] = 2**32 - 1
    words[1, 50:100] = 2**32 - 1
    bounds = rng.choice([1, 2, 3, 7, 1000, 2**16 + 1, 2**31 - 1], 2000)
    drawn = buffer_ops.integers_below(jnp.asarray(words, jnp.uint32), jnp.asarray(bounds))
    expected = [
        ((int(h) << 32 | int(w)) * int(b)) >> 64 for h, w, b in zip(*words, bounds, strict=True)
    ]
    np.testing.assert_array_equal(np.asarray(drawn), expected)


class TestLibrary:
    """The buffer on its own: no mesh, no trainer, no launcher code."""

    def test_one_device_without_a_mesh_draws_what_shard_map_on_one_device_draws(self):
        buffer = make_buffer(3, 4, num_candidates=6, num_reps=5)
        state = buffer.init(EXAMPLE)
        for step in range(4):
            ids = np.arange(8) + 8 * step
            inputs = id_batch(ids, ids % 3, task=step)
            state = insert(buffer, state, inputs, np.ones(8, bool), step, jax.random.key(step))
        key, shared = jax.random.key(1), jax.random.key(2)
        alone = jax.jit(buffer.sample)(state, key, shared)
        one = submesh(1)
        shard = jax.shard_map(
            lambda s, k, sk: buffer.sample(s, k, sk, JaxCollectives()),
            mesh=one,
            in_specs=(P(AXIS), P(), P()),
            out_specs=P(AXIS),
        )
        placed = jax.device_put(state, NamedSharding(one, P(AXIS)))
        jax.tree.map(np.testing.assert_array_equal, alone, jax.jit(shard)(placed, key, shared))
        assert (np.asarray(alone.weights) == 1).all()
        assert set(np.asarray(alone.data["inputs"])[:, ID].tolist()) <= set(range(32))

    def test_single_device_collectives_is_the_default(self):
        buffer = make_buffer(2, 3, num_candidates=2, num_reps=4)
        state = buffer.init(EXAMPLE)
        batch = {"inputs": id_batch(np.arange(4), np.arange(4) % 2, 0), "labels": np.arange(4) % 2}
        state = buffer.insert(state, batch, jax.random.key(0))
        key = jax.random.key(3)
        jax.tree.map(
            np.testing.assert_array_equal,
            buffer.sample(state, key, key),
            buffer.sample(state, key, key, SingleDevice()),
        )

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"budget_per_class": 0}, "budget_per_class"),
            ({"num_candidates": 1.5}, "num_candidates"),
            ({"policy": "fifo"}, "policy"),
            ({"memory_kind": "disk"}, "memory_kind"),
        ],
    )
    def test_factory_names_the_bad_setting(self, kwargs, field):
        settings = {"num_classes": 2, "budget_per_class": 3, "num_candidates": 1}
        with pytest.raises(ValueError, match=rf"^{field}="):
            buffer_lib.rehearsal_buffer(**{**settings, "num_representatives": 1, **kwargs})

    def test_more_candidates_than_batch_rows_is_refused(self):
        buffer = make_buffer(2, 3, num_candidates=5)
        batch = {"inputs": np.zeros((4, 3), np.int32), "labels": np.zeros(4, np.int32)}
        with pytest.raises(ValueError, match="num_candidates=5 exceeds the 4 rows"):
            buffer.insert(buffer.init(EXAMPLE), batch, jax.random.key(0))

    def test_importing_the_buffer_and_cljax_pulls_in_no_launcher_code(self):
        code = (
            "import sys, cljax.buffer, cljax\n"
            "heavy = ('cljax.runtime', 'cljax.trainer', 'ml_collections', 'flax', 'orbax',"
            " 'tensorflow_datasets', 'grain')\n"
            "print([m for m in heavy if m in sys.modules])\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[]"
