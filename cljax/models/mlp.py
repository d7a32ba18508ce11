"""Multi-layer perceptron on flattened inputs."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax.components import argument

INITIALISERS = {
    "lecun_normal": nn.initializers.lecun_normal(),
    "xavier_uniform": nn.initializers.xavier_uniform(),
}


class MLP(nn.Module):
    """ReLU MLP; the baseline model of continual-learning benchmarks on small inputs."""

    num_classes: int
    hidden_sizes: Sequence[int] = argument((256, 256), "widths of the hidden layers", minimum=1)
    weight_init: str = argument(
        "lecun_normal",
        "initialisation of the weights (biases start at 0): lecun_normal (Flax's) or"
        " xavier_uniform (Mammoth's, the DER paper's)",
        choices=tuple(INITIALISERS),
    )
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, mask: jax.Array | None = None):
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        kernel_init = INITIALISERS[self.weight_init]
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width, dtype=self.dtype, kernel_init=kernel_init)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init)(x)
