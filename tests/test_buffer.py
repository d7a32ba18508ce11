"""Properties of the rehearsal buffer, with samples that encode their own id.

Every sample's input is the int32 row [id, label, task], so any misplaced input, label or
task id is caught. Statistical tests use fixed seeds and reject at p < 1e-4.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from scipy import stats

from cljax import buffer as buffer_lib
from cljax.collectives import JaxCollectives
from cljax.distributed import AXIS

ID, LABEL, TASK = 0, 1, 2
P_VALUE_FLOOR = 1e-4


def id_batch(ids: np.ndarray, labels: np.ndarray, task: int) -> np.ndarray:
    """Inputs that carry their own id, label and task."""
    return np.stack([ids, labels, np.full_like(ids, task)], axis=-1).astype(np.int32)


def empty_buffer(num_classes: int, budget: int) -> buffer_lib.BufferState:
    return buffer_lib.init_buffer(num_classes, budget, (3,), jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_candidates", "policy"))
def insert(buffer, inputs, mask, task, key, num_candidates, policy="reservoir"):
    return buffer_lib.insert(
        buffer, inputs, inputs[:, LABEL], mask, task, key, num_candidates, policy
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
        buffer = empty_buffer(self.num_classes, self.budget)
        key = jax.random.key(0)
        candidates_so_far = 0
        for step, inputs, mask in self.stream(seed=1, steps=40):
            buffer = insert(buffer, inputs, mask, step % 3, jax.random.fold_in(key, step), 6)
            candidates_so_far += min(6, mask.sum())
            counts, seen = np.asarray(buffer.counts), np.asarray(buffer.seen)
            assert (counts <= self.budget).all()
            np.testing.assert_array_equal(counts, np.minimum(seen, self.budget))
            assert seen.sum() == candidates_so_far

    def test_free_slots_fill_before_any_replacement(self):
        """With every valid row a candidate, a class seen <= N times keeps all it saw."""
        buffer = empty_buffer(self.num_classes, self.budget)
        seen_ids = {c: [] for c in range(self.num_classes)}
        for step, inputs, mask in self.stream(seed=2, steps=12):
            buffer = insert(buffer, inputs, mask, 0, jax.random.key(step), self.batch)
            for row in inputs[mask]:
                seen_ids[row[LABEL]].append(row[ID])
            stored = np.asarray(buffer.inputs)[..., ID]
            for c in range(self.num_classes):
                kept = set(stored[c, : buffer.counts[c]].tolist())
                if len(seen_ids[c]) <= self.budget:
                    assert kept == set(seen_ids[c])
                else:
                    assert kept <= set(seen_ids[c]) and len(kept) == self.budget

    def test_stored_samples_stay_aligned_and_masked_rows_never_enter(self):
        buffer = empty_buffer(self.num_classes, self.budget)
        valid_ids = set()
        for step, inputs, mask in self.stream(seed=3, steps=30):
            buffer = insert(buffer, inputs, mask, step % 3, jax.random.key(step), 5)
            valid_ids |= set(inputs[mask, ID].tolist())
        filled = filled_slots(buffer)
        stored = np.asarray(buffer.inputs)[filled]
        assert set(stored[:, ID].tolist()) <= valid_ids
        assert len(set(stored[:, ID].tolist())) == len(stored)
        np.testing.assert_array_equal(stored[:, LABEL], np.asarray(buffer.labels)[filled])
        np.testing.assert_array_equal(stored[:, TASK], np.asarray(buffer.task_ids)[filled])
        class_of_slot = np.broadcast_to(np.arange(self.num_classes)[:, None], filled.shape)
        np.testing.assert_array_equal(stored[:, LABEL], class_of_slot[filled])


def retention_counts(policy: str, trials: int, budget: int, length: int, per_step: int):
    """How often each position of a one-class stream is still stored at its end."""

    def one_trial(key):
        buffer = empty_buffer(1, budget)
        for step in range(length // per_step):
            ids = jnp.arange(per_step) + step * per_step
            inputs = jnp.stack([ids, jnp.zeros_like(ids), jnp.zeros_like(ids)], -1)
            buffer = buffer_lib.insert(
                buffer,
                inputs,
                inputs[:, LABEL],
                jnp.ones(per_step, bool),
                0,
                jax.random.fold_in(key, step),
                per_step,
                policy,
            )
        return buffer.inputs[0, :, ID]

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
    """A sharded buffer where device d inserted `fills_per_device[d]` id-carrying samples."""
    num_devices = mesh.devices.size
    width = max(max(fills_per_device), 1)
    ids = np.arange(num_devices * width).reshape(num_devices, width)
    labels = ids % num_classes
    mask = np.arange(width)[None, :] < np.asarray(fills_per_device)[:, None]
    inputs = id_batch(ids.ravel(), labels.ravel(), task=0)

    def per_device(buffer, inputs, mask):
        buffer = jax.tree.map(lambda leaf: leaf[0], buffer)
        buffer = buffer_lib.insert(
            buffer, inputs, inputs[:, LABEL], mask, 0, jax.random.key(0), width
        )
        return jax.tree.map(lambda leaf: leaf[None], buffer)

    buffer = buffer_lib.init_sharded(mesh, empty_buffer, num_classes, budget)
    shard = jax.shard_map(per_device, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
    return jax.jit(shard)(buffer, inputs, mask.ravel())


def draw_rounds(mesh, buffer, num: int, rounds: int) -> buffer_lib.Representatives:
    """`rounds` independent calls of sample_global; leaves [rounds, D * num, ...]."""

    def per_device(buffer, key):
        buffer = jax.tree.map(lambda leaf: leaf[0], buffer)
        key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
        return buffer_lib.sample_global(buffer, key, num, JaxCollectives())

    shard = jax.shard_map(per_device, mesh=mesh, in_specs=(P(AXIS), P()), out_specs=P(AXIS))
    keys = jax.random.split(jax.random.key(11), rounds)
    return jax.jit(jax.vmap(shard, in_axes=(None, 0)))(buffer, keys)


class TestGlobalSampling:
    num_classes, budget = 3, 4

    @pytest.mark.parametrize("num", [8, 3, 20])
    def test_representatives_come_only_from_filled_slots(self, mesh, num):
        fills = [0, 1, 2, 5, 12, 0, 3, 7]
        buffer = global_buffer(mesh, fills, self.num_classes, self.budget)
        filled = np.asarray(buffer.inputs)[np.asarray(buffer.counts)[..., None] > np.arange(4)]
        reps = draw_rounds(mesh, buffer, num, rounds=50)
        ids = np.asarray(reps.inputs)[..., ID]
        weights = np.asarray(reps.weights)
        assert reps.inputs.shape[1] == mesh.devices.size * num
        assert set(ids[weights > 0].tolist()) <= set(filled[:, ID].tolist())
        np.testing.assert_array_equal(
            np.asarray(reps.labels)[weights > 0], np.asarray(reps.inputs)[..., LABEL][weights > 0]
        )
        assert (weights == 0).any() and (weights > 0).mean() > 0.5

    def test_empty_global_buffer_gives_only_zero_weights(self, mesh):
        buffer = global_buffer(mesh, [0] * 8, self.num_classes, self.budget)
        reps = draw_rounds(mesh, buffer, 8, rounds=3)
        assert (np.asarray(reps.weights) == 0).all()

    def test_equal_fills_give_every_global_slot_equal_probability(self, mesh):
        buffer = global_buffer(mesh, [12] * 8, self.num_classes, self.budget)
        reps = draw_rounds(mesh, buffer, 8, rounds=200)
        np.testing.assert_array_equal(np.asarray(reps.weights), 1.0)
        ids = np.asarray(reps.inputs)[..., ID].ravel()
        counts = np.bincount(ids, minlength=8 * 12)
        assert (counts > 0).all()
        assert stats.chisquare(counts).pvalue > P_VALUE_FLOOR

    def test_unequal_fills_draw_owners_uniformly_and_weight_by_fill(self, mesh):
        """Owner i's slots are drawn with probability 1/(D F_i) and weighted D F_i / F_total,
        so that the weighted share of every filled slot is 1 / F_total."""
        fills = [1, 2, 3, 4, 6, 8, 10, 12]
        buffer = global_buffer(mesh, fills, self.num_classes, self.budget)
        reps = draw_rounds(mesh, buffer, 16, rounds=100)
        ids = np.asarray(reps.inputs)[..., ID].ravel()
        owner = ids // 12
        fills_arr = np.asarray(fills)
        np.testing.assert_allclose(
            np.asarray(reps.weights).ravel(), 8 * fills_arr[owner] / fills_arr.sum()
        )
        filled_ids = np.concatenate([d * 12 + np.arange(f) for d, f in enumerate(fills)])
        observed = np.bincount(ids, minlength=8 * 12)[filled_ids]
        expected = len(ids) / (8 * fills_arr[filled_ids // 12])
        assert stats.chisquare(observed, expected).pvalue > P_VALUE_FLOOR
