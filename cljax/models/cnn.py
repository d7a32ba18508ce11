"""A small convolutional network for image inputs (N, H, W, C)."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax.components import argument


class SmallCNN(nn.Module):
    """3x3 conv blocks with ReLU and 2x2 max-pooling, then one dense layer."""

    num_classes: int
    channels: Sequence[int] = argument(
        (32, 64), "output channels of the 3x3 conv blocks", minimum=1
    )
    dense_size: int = argument(128, "width of the dense layer before the classifier", minimum=1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, mask: jax.Array | None = None):
        x = x.astype(self.dtype)
        for width in self.channels:
            x = nn.relu(nn.Conv(width, (3, 3), dtype=self.dtype)(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.dense_size, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)
