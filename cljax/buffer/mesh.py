"""The buffer on D devices without hand-written `shard_map`: `on_mesh(buffer, mesh)`.

    sharded = on_mesh(buffer, mesh)                 # mesh axis "data" by default
    state = sharded.init(example)                   # every device's buffer, split over the axis
    state = sharded.insert(state, batch, key)       # each device inserts from its rows
    representatives = sharded.sample(state, key)    # each device: r from the global buffer

`batch` holds global arrays whose leading axis is split over the mesh axis (device d's rows
are its local batch), as a data-parallel step sees them. One `key` serves every device: each
device folds in its index for its own draws, and the shift that all devices share comes from
the key itself. The methods work inside the user's own `jax.jit` or outside it.
"""

import dataclasses
from collections.abc import Mapping

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cljax.buffer.core import RehearsalBuffer
from cljax.buffer.state import BufferState, Example, Representatives
from cljax.collectives import AXIS, JaxCollectives


@dataclasses.dataclass(frozen=True)
class ShardedBuffer:
    """`buffer`'s functions over the devices of `axis` of `mesh` (see the module docstring)."""

    buffer: RehearsalBuffer
    mesh: Mesh
    axis: str = AXIS

    @property
    def sharding(self) -> NamedSharding:
        """How the global state and batches are split: leading axis over the mesh axis."""
        return NamedSharding(self.mesh, P(self.axis))

    def init(self, example: Example) -> BufferState:
        """Every device's empty buffer, storing the named tensors of `example`."""
        return self.buffer.init_sharded(example, self.sharding)

    def empty_representatives(self, example: Example) -> Representatives:
        """Every device's `num_representatives` empty representatives (weight 0)."""
        return self.buffer.empty_representatives_sharded(example, self.sharding)

    def insert(
        self, state: BufferState, batch: Mapping[str, jax.Array], key: jax.Array
    ) -> BufferState:
        """Each device inserts `num_candidates` of its own rows of `batch` into its buffer."""

        def per_device(state, batch, key):
            return self.buffer.insert(state, batch, self._own_key(key))

        specs = (P(self.axis), P(self.axis), P())
        return self._shard_map(per_device, specs, P(self.axis))(state, batch, key)

    def sample(self, state: BufferState, key: jax.Array) -> Representatives:
        """Each device's `num_representatives` representatives, drawn from the global buffer:
        a global array of D x r rows split over the mesh axis."""
        collectives = JaxCollectives(self.axis)

        def per_device(state, key):
            own, shared = jax.random.split(key)
            return self.buffer.sample(state, self._own_key(own), shared, collectives)

        return self._shard_map(per_device, (P(self.axis), P()), P(self.axis))(state, key)

    def _own_key(self, key: jax.Array) -> jax.Array:
        """This device's key: `key` with the device's index folded in."""
        return jax.random.fold_in(key, jax.lax.axis_index(self.axis))

    def _shard_map(self, function, in_specs, out_specs):
        return jax.shard_map(function, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)


def on_mesh(buffer: RehearsalBuffer, mesh: Mesh, axis: str = AXIS) -> ShardedBuffer:
    """`buffer` run over the devices of `axis` of `mesh`."""
    return ShardedBuffer(buffer, mesh, axis)
