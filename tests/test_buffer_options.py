"""The buffer's options beyond the paper's defaults: one reservoir over the whole stream,
draws without replacement, several independent draws per step, and the buffer on a mesh
without a hand-written shard_map. Statistical tests use fixed seeds and reject at p < 1e-4."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from scipy import stats

from cljax import buffer as buffer_lib
from cljax import strategies
from cljax.collectives import AXIS, JaxCollectives, SingleDevice
from tests.test_buffer import (
    EXAMPLE,
    ID,
    LABEL,
    P_VALUE_FLOOR,
    global_buffer,
    id_batch,
    owners_of,
    per_device_view,
)


def stream_retention(trials: int, budget: int, length: int, classes: int) -> np.ndarray:
    """How often each position of a stream of `classes` interleaved classes is still stored
    at its end, in a buffer of one partition for the whole stream."""
    buffer = buffer_lib.rehearsal_buffer(classes, budget, 4, 1, partition="stream")

    def one_trial(key):
        state = buffer.init(EXAMPLE)
        for step in range(length // 4):
            ids = jnp.arange(4) + step * 4
            inputs = jnp.stack([ids, ids % classes, jnp.zeros_like(ids)], -1)
            batch = {"inputs": inputs, "labels": ids % classes}
            state = buffer.insert(state, batch, jax.random.fold_in(key, step))
        return state.data["inputs"][0, :, ID], state.data["inputs"][0, :, LABEL], state.labels[0]

    kept, stored_labels, labels = jax.jit(jax.vmap(one_trial))(
        jax.random.split(jax.random.key(3), trials)
    )
    np.testing.assert_array_equal(stored_labels, labels)  # labels move with their samples
    return np.bincount(np.asarray(kept).ravel(), minlength=length)


def test_a_stream_partition_keeps_every_sample_of_the_stream_with_equal_probability():
    """One reservoir of 6 slots over 48 samples of 3 classes: each position with
    probability 6/48, whatever its class, and 6 slots in all (not 6 per class)."""
    counts = stream_retention(trials=3000, budget=6, length=48, classes=3)
    assert counts.sum() == 3000 * 6
    assert stats.chisquare(counts).pvalue > P_VALUE_FLOOR


def draws(buffer, state, rounds: int):
    """`rounds` calls of `sample` on one device, leaves [rounds, rows, ...]."""
    keys = jax.random.split(jax.random.key(5), rounds)
    return jax.jit(jax.vmap(lambda key: buffer.sample(state, key, key)))(keys)


def one_device_buffer(filled: int, num_reps: int, **options):
    buffer = buffer_lib.rehearsal_buffer(1, 16, 16, num_reps, partition="stream", **options)
    ids = np.arange(16)
    batch = {"inputs": id_batch(ids, ids * 0, 0), "labels": ids * 0, "mask": ids < filled}
    return buffer, buffer.insert(buffer.init(EXAMPLE), batch, jax.random.key(0))


def test_without_replacement_a_draw_holds_distinct_slots_each_equally_likely():
    buffer, state = one_device_buffer(12, 5, draw="without_replacement")
    reps = draws(buffer, state, 1200)
    ids = np.asarray(reps.data["inputs"])[..., ID]
    assert (np.asarray(reps.weights) == 1).all()
    assert all(len(set(row)) == 5 for row in ids.tolist())
    assert stats.chisquare(np.bincount(ids.ravel(), minlength=12)).pvalue > P_VALUE_FLOOR
    first = np.bincount(ids[:, 0], minlength=12)  # and in random order
    assert stats.chisquare(first).pvalue > P_VALUE_FLOOR


def test_without_replacement_a_small_buffer_gives_all_it_holds_and_weighs_the_rest_zero():
    buffer, state = one_device_buffer(3, 8, draw="without_replacement")
    reps = draws(buffer, state, 50)
    weights, ids = np.asarray(reps.weights), np.asarray(reps.data["inputs"])[..., ID]
    assert ((weights > 0).sum(axis=1) == 3).all()
    for row_ids, row_weights in zip(ids, weights, strict=True):
        assert sorted(row_ids[row_weights > 0].tolist()) == [0, 1, 2]


def test_without_replacement_on_eight_devices_every_valid_record_is_distinct(mesh):
    fills = np.asarray([0, 1, 2, 3, 5, 8, 12, 12])
    state = global_buffer(mesh, fills.tolist(), 3, 4)
    buffer = buffer_lib.rehearsal_buffer(3, 4, 12, 16, draw="without_replacement")

    def per_device(state, key):
        own = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
        return buffer.sample(state, own, key, JaxCollectives())

    shard = jax.shard_map(per_device, mesh=mesh, in_specs=(P(AXIS), P()), out_specs=P(AXIS))
    for round_key in jax.random.split(jax.random.key(1), 20):
        reps = jax.jit(shard)(state, round_key)
        weights = np.asarray(reps.weights)
        valid_ids = np.asarray(reps.data["inputs"])[..., ID][weights > 0]
        assert len(set(valid_ids.tolist())) == len(valid_ids)
        owners = owners_of(reps, 12)[weights > 0]
        np.testing.assert_allclose(weights[weights > 0], 8 * fills[owners] / fills.sum())
        # An owner of F_i <= 2 records gives them all: its r = 16 draws cover its slots.
        for owner in (1, 2):
            assert (owners == owner).sum() == fills[owner]


def test_two_draws_are_independent_each_without_replacement():
    """Two draws of 4 from 12 slots: each holds distinct slots, and they overlap as
    independent draws do (one draw of 8 split in two would never overlap)."""
    buffer, state = one_device_buffer(12, 4, draw="without_replacement", draws=2)
    reps = draws(buffer, state, 200)
    ids = np.asarray(reps.data["inputs"])[..., ID]
    assert ids.shape == (200, 8)
    first, second = ids[:, :4], ids[:, 4:]
    assert all(len(set(row)) == 4 for row in [*first.tolist(), *second.tolist()])
    overlapping = np.mean([bool(set(a) & set(b)) for a, b in zip(first, second, strict=True)])
    assert 0.8 < overlapping < 0.92  # 1 - C(8,4)/C(12,4) = 0.859


def test_one_draw_keeps_the_single_draw_of_the_paper_bit_for_bit():
    buffer, state = one_device_buffer(12, 4)
    key = jax.random.key(9)
    default = buffer.sample(state, key, key)
    assert default.labels.shape == (4,)
    explicit = buffer_lib.rehearsal_buffer(1, 16, 16, 4, partition="stream", draws=1)
    jax.tree.map(np.testing.assert_array_equal, default, explicit.sample(state, key, key))


def test_derpp_with_two_draws_matches_logits_on_the_first_and_labels_on_the_second():
    reps = buffer_lib.Representatives(
        data={"logits": jnp.asarray([[1.0, 0.0]] * 2 + [[9.0, 9.0]] * 2)},
        labels=jnp.asarray([1, 1, 0, 0]),
        task_ids=jnp.zeros(4, jnp.int32),
        weights=jnp.ones(4),
    )
    rep_logits = jnp.asarray([[1.0, 0.0]] * 2 + [[5.0, -5.0]] * 2)
    outputs = strategies.StepOutputs(
        logits=jnp.zeros((1, 2)),
        labels=jnp.zeros(1, jnp.int32),
        weights=jnp.zeros(1),
        rep_logits=rep_logits,
        reps=reps,
        totals=strategies.Totals(jnp.float32(1), jnp.float32(4)),
        inputs=jnp.zeros((5, 2)),
        apply=None,
        collectives=SingleDevice(),
        task_id=jnp.int32(0),
    )
    _, terms = strategies.DERpp(alpha=1.0, beta=1.0, draws=2).loss(outputs, ())
    assert float(terms["logit_mse"]) == 0.0  # the first draw's logits are those stored
    assert float(terms["replay_ce"]) < 1e-3  # the second draw's labels are predicted
    _, one_draw = strategies.DERpp(alpha=1.0, beta=1.0).loss(outputs, ())
    assert float(one_draw["logit_mse"]) > 1 and float(one_draw["replay_ce"]) > 0.5


def test_on_mesh_inserts_each_devices_rows_locally_and_draws_from_the_global_buffer(mesh):
    devices = mesh.devices.size
    buffer = buffer_lib.rehearsal_buffer(
        8, 4, num_candidates=4, num_representatives=16, partition="stream"
    )
    sharded = buffer_lib.on_mesh(buffer, mesh)
    state = sharded.init(EXAMPLE)
    ids = np.arange(devices * 4)
    labels = ids // 4  # device d's rows are of class d
    batch = {"inputs": id_batch(ids, labels, 0), "labels": labels}
    state = jax.jit(sharded.insert)(state, batch, jax.random.key(0))
    stored = per_device_view(state, devices).data["inputs"][..., LABEL]
    assert (stored.reshape(devices, -1) == np.arange(devices)[:, None]).all()
    reps = jax.jit(sharded.sample)(state, jax.random.key(1))
    assert reps.labels.shape == (devices * 16,)
    np.testing.assert_array_equal(np.asarray(reps.weights), 1.0)
    received = np.asarray(reps.labels).reshape(devices, 16)
    assert all(len(set(row.tolist())) == devices for row in received)  # from every owner


def test_class_balanced_buffer_shares_its_slots_equally_among_the_classes_seen():
    """GDumb's sampler, 6 slots: six samples of class 0 fill it; three of class 1 then take
    slots of class 0 (3 and 3), three more are refused; two of class 2 make it 2, 2, 2. Each
    class keeps samples it was given, each slot its own sample's tensors; the victims of
    class 0 are uniform among its slots."""
    buffer = buffer_lib.rehearsal_buffer(3, 6, 3, 1, policy="class_balanced", partition="stream")
    insert = jax.jit(buffer.insert)

    def fill(key):
        state, first_id = buffer.init(EXAMPLE), 0
        for step, labels in enumerate([[0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1], [2, 2, 0]]):
            ids = jnp.arange(3) + first_id
            first_id += 3
            inputs = jnp.stack([ids, jnp.asarray(labels), jnp.zeros_like(ids)], -1)
            mask = jnp.asarray([True, True, step != 4])  # the last class-0 row is padding
            batch = {"inputs": inputs, "labels": jnp.asarray(labels), "mask": mask}
            state = insert(state, batch, jax.random.fold_in(key, step))
        return state

    kept = []
    for trial in range(200):
        state = fill(jax.random.key(trial))
        labels, inputs = np.asarray(state.labels[0]), np.asarray(state.data["inputs"][0])
        assert int(state.counts[0]) == 6
        assert np.bincount(labels, minlength=3).tolist() == [2, 2, 2]
        np.testing.assert_array_equal(inputs[:, LABEL], labels)
        assert set(inputs[labels == 1, ID]) <= {6, 7, 8}  # the later three were refused
        kept.extend(inputs[labels == 0, ID])
    counts = np.bincount(kept, minlength=6)[:6]  # 2 of the 6 class-0 samples, 200 times
    assert stats.chisquare(counts).pvalue > P_VALUE_FLOOR
