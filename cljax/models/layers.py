"""Layers shared by the models: cross-device BatchNorm and convolutions padded as in PyTorch.

`BatchNorm` computes its training statistics over the rows marked by `mask` (new samples
and real representatives, never padding or empty representative slots) on every device of
the data-parallel axis, summed through the `Collectives` interface, in float32: a D-device
step equals the single-device step on the global batch. Running averages (float32) serve
evaluation.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax.collectives import Collectives, SingleDevice


class BatchNorm(nn.Module):
    """Batch normalisation over all rows of all devices; statistics and parameters in float32.

    `momentum` is the weight of the old running average (0.9 is PyTorch's 0.1).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    collectives: Collectives = SingleDevice()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if train:
            mean, var = self._batch_statistics(x32, mask)
            if not self.is_initializing():
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        else:
            mean, var = running_mean.value, running_var.value
        y = (x32 - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(self.dtype)

    def _batch_statistics(self, x: jax.Array, mask: jax.Array | None):
        """Mean and (biased) variance over the rows `mask` marks, on every device."""
        axes = tuple(range(x.ndim - 1))
        weights = jnp.ones(x.shape[0], jnp.float32) if mask is None else mask.astype(jnp.float32)
        weights = weights.reshape(-1, *([1] * (x.ndim - 1)))
        per_row = x[0].size // x.shape[-1]
        total, squares, count = self.collectives.sum(
            (
                (x * weights).sum(axes),
                (x * x * weights).sum(axes),
                weights.sum() * per_row,
            )
        )
        count = jnp.maximum(count, 1.0)
        mean = total / count
        return mean, jnp.maximum(squares / count - mean * mean, 0.0)


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
    dtype: Any = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A k x k convolution padded by (k - 1) // 2 on every side, as PyTorch's models are
    (Flax's 'SAME' pads strided convolutions asymmetrically)."""
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        name=name,
    )


def global_average_pool(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, C), in float32."""
    return x.astype(jnp.float32).mean(axis=(1, 2))


def count_parameters(params: Any) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(params))
