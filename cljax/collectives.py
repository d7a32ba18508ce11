"""The collectives that per-device code uses, behind one small interface.

Buffer and step code call these methods inside `shard_map` and never name a backend.
`JaxCollectives` maps them onto `jax.lax` collectives over the mesh axis.
"""

from typing import Protocol

import jax
from jax import lax

from cljax.distributed import AXIS


class Collectives(Protocol):
    """What per-device code may ask of the other devices."""

    def num_devices(self) -> int: ...

    def device_index(self) -> jax.Array: ...

    def per_device(self, tree):
        """Marks replicated values as per-device, so that gradients with respect to them
        stay local until summed explicitly with `sum`."""

    def sum(self, tree): ...

    def mean(self, tree): ...

    def all_to_all(self, tree):
        """Sends slice i of every leaf's leading axis to device i; slice j of the result
        came from device j."""


class JaxCollectives:
    """`jax.lax` collectives over a named mesh axis."""

    def __init__(self, axis_name: str = AXIS):
        self.axis_name = axis_name

    def num_devices(self) -> int:
        return lax.axis_size(self.axis_name)

    def device_index(self) -> jax.Array:
        return lax.axis_index(self.axis_name)

    def per_device(self, tree):
        return lax.pcast(tree, self.axis_name, to="varying")

    def sum(self, tree):
        return lax.psum(tree, self.axis_name)

    def mean(self, tree):
        return lax.pmean(tree, self.axis_name)

    def all_to_all(self, tree):
        return jax.tree.map(
            lambda leaf: lax.all_to_all(leaf, self.axis_name, 0, 0, tiled=False), tree
        )
