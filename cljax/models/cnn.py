"""A small convolutional network for image inputs (N, H, W, C)."""

from collections.abc import Sequence

import flax.linen as nn
import jax


class SmallCNN(nn.Module):
    """3x3 conv blocks with ReLU and 2x2 max-pooling, then one dense layer."""

    num_classes: int
    channels: Sequence[int] = (32, 64)
    dense_size: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.channels:
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.dense_size)(x))
        return nn.Dense(self.num_classes)(x)
