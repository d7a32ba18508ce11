"""Augmentation and normalisation on the device, seeded by the step's key.

Images reach the device in their stored dtype (uint8) and are augmented there, so that a
replayed sample gets a fresh augmentation every time it is drawn, from the un-augmented
copy the buffer keeps:

- `crop_flip` (CIFAR-size images): random crop after zero-padding by 4, and random
  horizontal flip, of every row of [batch ‖ representatives];
- `inception` (ImageNet-size images): new samples arrive already random-resized-cropped and
  flipped by the input pipeline (from the full decoded image); representatives are stored as
  the image resized and centre-cropped to the input size, and get a random resized crop of
  that view (scale 0.08-1, aspect 3/4-4/3), resized back, and a random flip.

`normalise` maps stored values to (x / max_value - mean) / std per channel, in the model's
computation dtype.
"""

import math

import jax
import jax.numpy as jnp

MODES = ("auto", "none", "crop_flip", "inception")
CROP_PADDING = 4
SCALE = (0.08, 1.0)
LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def crop_flip(images: jax.Array, key: jax.Array, padding: int = CROP_PADDING) -> jax.Array:
    """Random crop after zero-padding by `padding`, and random horizontal flip (NHWC)."""
    num, height, width = images.shape[:3]
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (num, 2), 0, 2 * padding + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (num,))
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def one(image, offset, flip):
        crop = jax.lax.dynamic_slice(
            image, (offset[0], offset[1], 0), (height, width, image.shape[-1])
        )
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)


def random_resized_crop_flip(images: jax.Array, key: jax.Array) -> jax.Array:
    """A random crop of each image (area fraction in `SCALE`, aspect ratio 3/4 to 4/3, as
    Inception's), resized back to the image's size (bilinear), then a random flip; float32."""
    num, height, width = images.shape[:3]
    area_key, ratio_key, y_key, x_key, flip_key = jax.random.split(key, 5)
    area = jax.random.uniform(area_key, (num,), minval=SCALE[0], maxval=SCALE[1]) * height * width
    ratio = jnp.exp(jax.random.uniform(ratio_key, (num,), minval=LOG_RATIO[0], maxval=LOG_RATIO[1]))
    crop_w = jnp.clip(jnp.sqrt(area * ratio), 1.0, width)
    crop_h = jnp.clip(jnp.sqrt(area / ratio), 1.0, height)
    top = jax.random.uniform(y_key, (num,)) * (height - crop_h)
    left = jax.random.uniform(x_key, (num,)) * (width - crop_w)
    flips = jax.random.bernoulli(flip_key, 0.5, (num,))

    def one(image, top, left, crop_h, crop_w, flip):
        scale = jnp.stack([height / crop_h, width / crop_w])
        out = jax.image.scale_and_translate(
            image.astype(jnp.float32),
            image.shape,
            spatial_dims=(0, 1),
            scale=scale,
            translation=-jnp.stack([top, left]) * scale,
            method="linear",
            antialias=True,
        )
        return jnp.where(flip, out[:, ::-1], out)

    return jax.vmap(one)(images, top, left, crop_h, crop_w, flips)


def augment(mode: str, new: jax.Array, replayed: jax.Array | None, key: jax.Array) -> jax.Array:
    """[new ‖ replayed] rows after the augmentation of `mode` (see the module docstring)."""
    rows = new if replayed is None else jnp.concatenate([new, replayed])
    if mode == "crop_flip":
        return crop_flip(rows, key)
    if mode == "inception" and replayed is not None:
        crops = random_resized_crop_flip(replayed, key)
        return jnp.concatenate([new.astype(jnp.float32), crops])
    return rows


def normalise(
    inputs: jax.Array, max_value: float, mean: jax.Array, std: jax.Array, dtype=jnp.float32
) -> jax.Array:
    """(inputs / max_value - mean) / std, per channel (the last axis), in `dtype`."""
    return ((inputs.astype(jnp.float32) / max_value - mean) / std).astype(dtype)
