"""Multi-layer perceptron on flattened inputs."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax.components import argument


class MLP(nn.Module):
    """ReLU MLP; the baseline model of continual-learning benchmarks on small inputs."""

    num_classes: int
    hidden_sizes: Sequence[int] = argument((256, 256), "widths of the hidden layers", minimum=1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, mask: jax.Array | None = None):
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)
