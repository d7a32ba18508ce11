"""Augmentation on the device: what the crops are, and that replayed samples are augmented
afresh at every step, identically for the same step key."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import augment, steps, strategies
from cljax import buffer as buffer_lib
from cljax.models.mlp import MLP

IMAGE = (8, 8, 3)


def images(count: int = 6, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(1, 256, (count, *IMAGE), np.uint8))


def test_crop_flip_gives_a_flipped_or_plain_crop_of_the_padded_image():
    originals = images()
    augmented = augment.crop_flip(originals, jax.random.key(3))
    pad = augment.CROP_PADDING
    padded = np.pad(np.asarray(originals), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    for image, out in zip(padded, np.asarray(augmented), strict=True):
        crops = [
            view
            for top in range(2 * pad + 1)
            for left in range(2 * pad + 1)
            for view in (image[top : top + 8, left : left + 8],)
        ]
        assert any(np.array_equal(out, c) or np.array_equal(out, c[:, ::-1]) for c in crops)
    np.testing.assert_array_equal(augmented, augment.crop_flip(originals, jax.random.key(3)))
    assert not np.array_equal(augmented, augment.crop_flip(originals, jax.random.key(4)))


def test_random_resized_crops_are_seeded_and_stay_in_range():
    originals = images()
    first = augment.random_resized_crop_flip(originals, jax.random.key(1))
    assert first.shape == originals.shape and first.dtype == jnp.float32
    assert float(first.min()) >= -1e-3 and float(first.max()) <= 255 + 1e-3
    np.testing.assert_array_equal(
        first, augment.random_resized_crop_flip(originals, jax.random.key(1))
    )
    assert not np.array_equal(first, augment.random_resized_crop_flip(originals, jax.random.key(2)))


def test_normalise_maps_stored_values_per_channel():
    x = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
    out = augment.normalise(x, 255.0, jnp.array([0.5, 0.0, 1.0]), jnp.array([0.5, 1.0, 2.0]))
    np.testing.assert_allclose(out[0, 0, 0], [1.0, 1.0, 0.0])


def setup(runtime, mode: str):
    """ER with an MLP on 8x8 RGB images, augmentation `mode`, a buffer already filled."""
    buffer = buffer_lib.rehearsal_buffer(3, 4, 2, 4)
    settings = steps.StepConfig(
        model=MLP(num_classes=3, hidden_sizes=(16,)),
        optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
        strategy=strategies.ER(),
        max_value=255.0,
        augmentation=mode,
        buffer=buffer,
    )
    state = jax.device_put(
        steps.create_train_state(settings, jnp.zeros((1, *IMAGE), jnp.uint8), jax.random.key(0)),
        runtime.replicated,
    )
    example = {"inputs": jax.ShapeDtypeStruct(IMAGE, np.dtype(np.uint8))}
    rehearsal = buffer_lib.RehearsalState(
        buffer.init_sharded(example, runtime.sharded),
        buffer.empty_representatives_sharded(example, runtime.sharded),
    )
    train_step = steps.make_train_step(runtime, settings)
    for step in range(3):
        state, rehearsal, _ = train_step(state, rehearsal, batch(runtime, step), jnp.int32(0), 0.1)
    return jax.device_get((state, rehearsal)), train_step


def batch(runtime, step: int, valid: bool = True) -> dict:
    size = 4 * runtime.num_devices
    return {
        "inputs": np.asarray(images(size, seed=step)),
        "labels": (np.arange(size) % 3).astype(np.int32),
        "mask": np.full(size, valid),
    }


@pytest.mark.parametrize("mode", ["crop_flip", "inception"])
def test_replayed_samples_are_augmented_afresh_by_the_step_key(runtime, mode):
    """With every new row masked out, the loss comes from the representatives alone: it
    changes with the step's key (a new augmentation of the stored copy) and not between
    two runs of the same key."""
    (state, rehearsal), train_step = setup(runtime, mode)
    assert rehearsal.representatives.weights.sum() > 0

    def loss_with_key(seed: int) -> float:
        keyed = state.replace(rng=jax.random.key(seed))
        placed = jax.device_put(keyed, runtime.replicated)
        reps = jax.device_put(rehearsal, runtime.sharded)
        _, _, metrics = train_step(placed, reps, batch(runtime, 9, valid=False), jnp.int32(0), 0.1)
        return float(metrics["loss"])

    first, again, other = loss_with_key(1), loss_with_key(1), loss_with_key(2)
    assert first == again
    assert first != other
