"""Multi-layer perceptron on flattened inputs."""

from collections.abc import Sequence

import flax.linen as nn
import jax

from cljax.components import argument


class MLP(nn.Module):
    """ReLU MLP; the baseline model of continual-learning benchmarks on small inputs."""

    num_classes: int
    hidden_sizes: Sequence[int] = argument((256, 256), "widths of the hidden layers", minimum=1)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, mask: jax.Array | None = None):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)
