"""The collectives that per-device code uses, behind one small interface.

Buffer, model and step code call these methods and never name a backend:
`JaxCollectives` maps them onto `jax.lax` collectives over the mesh axis `AXIS` (inside
`shard_map`), `MpiCollectives` onto mpi4jax calls between processes, and `SingleDevice`
onto nothing at all, for one device in a plain `jax.jit` loop without a mesh.
"""

from typing import Protocol

import jax
import jax.extend
import jax.numpy as jnp
from jax import lax

AXIS = "data"


class Collectives(Protocol):
    """What per-device code may ask of the other devices."""

    def num_devices(self) -> int: ...

    def device_index(self) -> jax.Array: ...

    def per_device(self, tree):
        """Marks replicated values as per-device, so that gradients with respect to them
        stay local until summed explicitly with `sum`."""

    def sum(self, tree): ...

    def all_to_all(self, tree):
        """Sends slice i of every leaf's leading axis to device i; slice j of the result
        came from device j."""

    def receive_shifted(self, tree, shift: jax.Array):
        """Row t of the result on device j is row t of device (j + shift + t) mod D.

        Leaves have fewer than D rows; `shift` must be the same on every device.
        """


class SingleDevice:
    """One device and no mesh: every collective is the identity."""

    def num_devices(self) -> int:
        return 1

    def device_index(self) -> jax.Array:
        return jnp.int32(0)

    def per_device(self, tree):
        return tree

    def sum(self, tree):
        return tree

    def all_to_all(self, tree):
        return tree

    def receive_shifted(self, tree, shift: jax.Array):
        """Leaves have fewer rows than the one device: none."""
        return tree


class JaxCollectives:
    """`jax.lax` collectives over a named mesh axis.

    `ragged` picks how `receive_shifted` moves its rows: True, one `ragged_all_to_all` that
    carries exactly the rows asked for (GPU and TPU have it); False, one padded
    `all_to_all` (XLA:CPU has no ragged all-to-all); None, by the default backend.
    """

    def __init__(self, axis_name: str = AXIS, ragged: bool | None = None):
        self.axis_name = axis_name
        self.ragged = jax.default_backend() in RAGGED_BACKENDS if ragged is None else ragged

    def num_devices(self) -> int:
        return lax.axis_size(self.axis_name)

    def device_index(self) -> jax.Array:
        return lax.axis_index(self.axis_name)

    def per_device(self, tree):
        return lax.pcast(tree, self.axis_name, to="varying")

    def sum(self, tree):
        return lax.psum(tree, self.axis_name)

    def all_to_all(self, tree):
        return jax.tree.map(
            lambda leaf: lax.all_to_all(leaf, self.axis_name, 0, 0, tiled=False), tree
        )

    def receive_shifted(self, tree, shift: jax.Array):
        num_rows = jax.tree.leaves(tree)[0].shape[0]
        if not self.ragged or num_rows == 0:
            return _receive_shifted_padded(self, tree, shift)
        plan = shifted_plan(self.device_index(), shift, self.num_devices(), num_rows)
        return jax.tree.map(
            lambda leaf: self.ragged_all_to_all(leaf, jnp.zeros_like(leaf), *plan), tree
        )

    def ragged_all_to_all(
        self, operand, output, input_offsets, send_sizes, output_offsets, recv_sizes
    ):
        """`lax.ragged_all_to_all` over the mesh axis."""
        return lax.ragged_all_to_all(
            operand,
            output,
            input_offsets,
            send_sizes,
            output_offsets,
            recv_sizes,
            axis_name=self.axis_name,
        )


RAGGED_BACKENDS = ("gpu", "tpu")


def shifted_plan(index: jax.Array, shift: jax.Array, num_devices: int, num_rows: int):
    """`ragged_all_to_all`'s (input offsets, send sizes, output offsets, receive sizes) for
    `receive_shifted`: this device sends its row t to device (index - shift - t) mod D, where
    it becomes row t; rows t >= `num_rows` do not exist."""
    peers = jnp.arange(num_devices, dtype=jnp.int32)
    sent_row = _shifted_row(index, peers, shift, num_devices)
    send_sizes = (sent_row < num_rows).astype(jnp.int32)
    offsets = jnp.where(send_sizes > 0, sent_row, 0).astype(jnp.int32)
    recv_sizes = (_shifted_row(peers, index, shift, num_devices) < num_rows).astype(jnp.int32)
    return offsets, send_sizes, offsets, recv_sizes


def _shifted_row(sender, receiver, shift: jax.Array, num_devices: int):
    """Which row of `sender` `receive_shifted` delivers to `receiver` (none where >= the
    number of rows): row t goes to device (sender - shift - t) mod D."""
    return (sender - shift - receiver) % num_devices


def _receive_shifted_padded(collectives: Collectives, tree, shift: jax.Array):
    """`receive_shifted` with one `all_to_all` of one row per device: device d gets row
    (index - shift - d) mod D, or an unused row where that is no row, and keeps the rows it
    expects. Receives D rows to keep fewer than D, in one collective whatever D."""
    num_rows = jax.tree.leaves(tree)[0].shape[0]
    if num_rows == 0:
        return tree
    num_devices, index = collectives.num_devices(), collectives.device_index()
    peers = jnp.arange(num_devices)
    sent_rows = jnp.minimum(_shifted_row(index, peers, shift, num_devices), num_rows - 1)
    received = collectives.all_to_all(jax.tree.map(lambda leaf: leaf[sent_rows], tree))
    owners = (index + shift + jnp.arange(num_rows)) % num_devices
    return jax.tree.map(lambda leaf: leaf[owners], received)


_RECEIVING = ("all_to_all", "ragged_all_to_all", "ppermute", "psum", "psum_invariant", "all_gather")


def received_bytes(jaxpr: jax.extend.core.Jaxpr) -> int:
    """Bytes one device receives through collectives when `jaxpr` runs once per device.

    Counts the outputs of every receiving collective; of the branches of a `cond` (one of
    which runs), the largest.
    """
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _RECEIVING:
            total += sum(var.aval.size * var.aval.dtype.itemsize for var in eqn.outvars)
        elif eqn.primitive.name == "cond":
            total += max(received_bytes(branch.jaxpr) for branch in eqn.params["branches"])
        else:
            total += sum(received_bytes(sub) for sub in sub_jaxprs(eqn))
    return total


def sub_jaxprs(eqn):
    """The jaxprs inside `eqn` (a cond's branches, a scan's body, ...)."""
    for param in eqn.params.values():
        for value in param if isinstance(param, list | tuple) else [param]:
            if isinstance(value, jax.extend.core.ClosedJaxpr):
                yield value.jaxpr
            elif isinstance(value, jax.extend.core.Jaxpr):
                yield value


class MpiCollectives:
    """mpi4jax collectives over an MPI communicator, one device per process.

    Used by `mpirun`-launched jobs without jax.distributed: each process runs the per-device
    program itself (no `shard_map`), and these calls reach the other processes.
    """

    def __init__(self, comm=None):
        from mpi4py import MPI

        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self._sum_op = MPI.SUM

    def num_devices(self) -> int:
        return self.comm.Get_size()

    def device_index(self) -> jax.Array:
        return jnp.int32(self.comm.Get_rank())

    def per_device(self, tree):
        return tree

    def sum(self, tree):
        import mpi4jax

        return jax.tree.map(lambda x: mpi4jax.allreduce(x, op=self._sum_op, comm=self.comm), tree)

    def all_to_all(self, tree):
        import mpi4jax

        return jax.tree.map(lambda x: mpi4jax.alltoall(x, comm=self.comm), tree)

    def receive_shifted(self, tree, shift: jax.Array):
        return _receive_shifted_padded(self, tree, shift)
