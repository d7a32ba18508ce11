"""ResNets as torchvision builds them (v1.5: the stride on the 3x3 convolution), with
cross-device BatchNorm. ResNet-18 has 11,689,512 parameters and ResNet-50 25,557,032 at
1000 classes, as torchvision's (tested). `resnet18_cifar` is the DER paper's backbone for
32x32 inputs: a 3x3 stem of stride 1 and no max-pooling.
"""

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax.collectives import Collectives, SingleDevice
from cljax.components import argument
from cljax.models.layers import BatchNorm, conv, global_average_pool


class _Block(nn.Module):
    """A residual block: `bottleneck` (1x1, 3x3, 1x1 x4) or basic (3x3, 3x3)."""

    features: int
    stride: int
    bottleneck: bool
    zero_init: bool
    dtype: Any
    collectives: Collectives

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
        norm = functools.partial(BatchNorm, dtype=self.dtype, collectives=self.collectives)
        last_scale = nn.initializers.zeros if self.zero_init else nn.initializers.ones
        if self.bottleneck:
            shapes = [(self.features, 1, 1), (self.features, 3, self.stride)]
            out_features = 4 * self.features
            final = (out_features, 1, 1)
        else:
            shapes = [(self.features, 3, self.stride)]
            out_features = self.features
            final = (out_features, 3, 1)
        y = x
        for features, kernel, stride in shapes:
            y = conv(features, kernel, stride, dtype=self.dtype)(y)
            y = nn.relu(norm()(y, train=train, mask=mask))
        y = conv(final[0], final[1], final[2], dtype=self.dtype)(y)
        y = norm(scale_init=last_scale)(y, train=train, mask=mask)
        shortcut = x
        if x.shape[-1] != out_features or self.stride != 1:
            shortcut = conv(out_features, 1, self.stride, dtype=self.dtype)(x)
            shortcut = norm()(shortcut, train=train, mask=mask)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """ResNet; the subclasses fix the depth, the block and the stem."""

    STAGE_SIZES: ClassVar[Sequence[int]] = (2, 2, 2, 2)
    #: How many times smaller than the input its last feature maps are.
    REDUCTION: ClassVar[int] = 32
    BOTTLENECK: ClassVar[bool] = False
    CIFAR_STEM: ClassVar[bool] = False

    num_classes: int
    width: int = argument(64, "channels of the first stage (torchvision: 64)", minimum=1)
    zero_init_residual: bool = argument(
        False, "start each residual branch's last BatchNorm scale at 0 (the paper's runs: no)"
    )
    dtype: Any = jnp.float32
    collectives: Collectives = SingleDevice()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, mask: jax.Array | None = None):
        x = x.astype(self.dtype)
        norm = functools.partial(BatchNorm, dtype=self.dtype, collectives=self.collectives)
        if self.CIFAR_STEM:
            x = nn.relu(norm()(conv(self.width, 3, dtype=self.dtype)(x), train=train, mask=mask))
        else:
            x = conv(self.width, 7, 2, dtype=self.dtype)(x)
            x = nn.relu(norm()(x, train=train, mask=mask))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, blocks in enumerate(self.STAGE_SIZES):
            for index in range(blocks):
                x = _Block(
                    features=self.width * 2**stage,
                    stride=2 if stage > 0 and index == 0 else 1,
                    bottleneck=self.BOTTLENECK,
                    zero_init=self.zero_init_residual,
                    dtype=self.dtype,
                    collectives=self.collectives,
                )(x, train, mask)
        return nn.Dense(self.num_classes, dtype=self.dtype)(global_average_pool(x))


class ResNet18(ResNet):
    """ResNet-18: basic blocks, stages of 2, 2, 2, 2; the ImageNet stem."""


class ResNet50(ResNet):
    """ResNet-50: bottleneck blocks, stages of 3, 4, 6, 3; the ImageNet stem."""

    STAGE_SIZES: ClassVar[Sequence[int]] = (3, 4, 6, 3)
    BOTTLENECK: ClassVar[bool] = True


class ResNet18Cifar(ResNet):
    """ResNet-18 for 32x32 inputs (the DER paper's backbone): a 3x3 stride-1 stem."""

    CIFAR_STEM: ClassVar[bool] = True
    REDUCTION: ClassVar[int] = 8
