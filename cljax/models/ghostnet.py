"""GhostNet (Han et al. 2020), layer for layer as timm's `ghostnet` (the paper's
`ghostnet_050` is `width=0.5`), with cross-device BatchNorm.

Each Ghost module makes half its channels with a 1x1 convolution and the other half with a
cheap depthwise 3x3 one; bottlenecks stack two of them, with a strided depthwise convolution
and squeeze-and-excitation (hard sigmoid gate) where the table below says.
"""

import functools
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax.collectives import Collectives, SingleDevice
from cljax.components import argument
from cljax.models.layers import BatchNorm, conv, global_average_pool

# Per stage, its bottlenecks: kernel, expansion channels, output channels, SE ratio, stride.
STAGES = (
    ((3, 16, 16, 0.0, 1),),
    ((3, 48, 24, 0.0, 2),),
    ((3, 72, 24, 0.0, 1),),
    ((5, 72, 40, 0.25, 2),),
    ((5, 120, 40, 0.25, 1),),
    ((3, 240, 80, 0.0, 2),),
    (
        (3, 200, 80, 0.0, 1),
        (3, 184, 80, 0.0, 1),
        (3, 184, 80, 0.0, 1),
        (3, 480, 112, 0.25, 1),
        (3, 672, 112, 0.25, 1),
    ),
    ((5, 672, 160, 0.25, 2),),
    (
        (5, 960, 160, 0.0, 1),
        (5, 960, 160, 0.25, 1),
        (5, 960, 160, 0.0, 1),
        (5, 960, 160, 0.25, 1),
    ),
)
HEAD_FEATURES = 1280


def make_divisible(value: float, divisor: int = 4) -> int:
    """The nearest multiple of `divisor` (at least `divisor`), never 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def hard_sigmoid(x: jax.Array) -> jax.Array:
    return jax.nn.relu6(x + 3.0) / 6.0


class _Layers(nn.Module):
    """Convolution + BatchNorm (+ ReLU) builders shared by the blocks."""

    dtype: Any
    collectives: Collectives

    def conv_norm(self, x, features, kernel, stride=1, groups=1, relu=True, *, train, mask):
        x = conv(features, kernel, stride, groups=groups, dtype=self.dtype)(x)
        x = BatchNorm(dtype=self.dtype, collectives=self.collectives)(x, train=train, mask=mask)
        return nn.relu(x) if relu else x


class _GhostModule(_Layers):
    features: int = 0
    relu: bool = True

    @nn.compact
    def __call__(self, x, train: bool, mask):
        primary = math.ceil(self.features / 2)
        x1 = self.conv_norm(x, primary, 1, relu=self.relu, train=train, mask=mask)
        x2 = self.conv_norm(x1, primary, 3, groups=primary, relu=self.relu, train=train, mask=mask)
        return jnp.concatenate([x1, x2], axis=-1)[..., : self.features]


class _SqueezeExcite(nn.Module):
    ratio: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        gate = x.mean(axis=(1, 2), keepdims=True)
        gate = nn.relu(dense(make_divisible(channels * self.ratio))(gate))
        return x * hard_sigmoid(dense(channels)(gate))


class _Bottleneck(_Layers):
    expansion: int = 0
    features: int = 0
    kernel: int = 3
    stride: int = 1
    se_ratio: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool, mask):
        layers = {"dtype": self.dtype, "collectives": self.collectives}
        shortcut = x
        y = _GhostModule(**layers, features=self.expansion, relu=True)(x, train, mask)
        if self.stride > 1:
            y = self.conv_norm(
                y,
                self.expansion,
                self.kernel,
                self.stride,
                self.expansion,
                relu=False,
                train=train,
                mask=mask,
            )
        if self.se_ratio > 0:
            y = _SqueezeExcite(self.se_ratio, self.dtype)(y)
        y = _GhostModule(**layers, features=self.features, relu=False)(y, train, mask)
        channels = x.shape[-1]
        if channels != self.features or self.stride != 1:
            shortcut = self.conv_norm(
                x, channels, self.kernel, self.stride, channels, relu=False, train=train, mask=mask
            )
            shortcut = self.conv_norm(
                shortcut, self.features, 1, relu=False, train=train, mask=mask
            )
        return y + shortcut


class GhostNet(_Layers):
    """GhostNet v1; `width` 0.5 is timm's `ghostnet_050`, the paper's model."""

    #: How many times smaller than the input its last feature maps are.
    REDUCTION: ClassVar[int] = 32

    num_classes: int = 0
    width: float = argument(0.5, "width multiplier (the paper's ghostnet_050: 0.5)", minimum=0.05)
    dropout: float = argument(
        0.2, "dropout rate before the classifier (timm: 0.2; the paper's runs: 0.225)", minimum=0
    )
    dtype: Any = jnp.float32
    collectives: Collectives = SingleDevice()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, mask: jax.Array | None = None):
        layers = {"dtype": self.dtype, "collectives": self.collectives}
        x = x.astype(self.dtype)
        x = self.conv_norm(x, make_divisible(16 * self.width), 3, 2, train=train, mask=mask)
        for stage in STAGES:
            for kernel, expansion, features, se_ratio, stride in stage:
                x = _Bottleneck(
                    **layers,
                    expansion=make_divisible(expansion * self.width),
                    features=make_divisible(features * self.width),
                    kernel=kernel,
                    stride=stride,
                    se_ratio=se_ratio,
                )(x, train, mask)
        x = self.conv_norm(
            x, make_divisible(STAGES[-1][-1][1] * self.width), 1, train=train, mask=mask
        )
        x = nn.relu(nn.Dense(HEAD_FEATURES, dtype=self.dtype)(global_average_pool(x)))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)
