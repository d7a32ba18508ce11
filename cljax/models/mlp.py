"""Multi-layer perceptron on flattened inputs."""

from collections.abc import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """ReLU MLP; the baseline model of continual-learning benchmarks on small inputs."""

    num_classes: int
    hidden_sizes: Sequence[int] = (256, 256)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)
