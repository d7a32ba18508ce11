"""Device set-up and the data-parallel mesh.

All start-up that depends on where cljax runs lives here, so the rest of the code only
ever sees a `jax.sharding.Mesh` with one axis, `AXIS`.
"""

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def configure_cpu_devices(num_devices: int) -> None:
    """Asks the CPU backend for `num_devices` simulated devices.

    Must run before JAX starts a backend. In a notebook where JAX already started, the
    existing devices are kept and a warning says how many there are.
    """
    try:
        jax.config.update("jax_num_cpu_devices", num_devices)
    except RuntimeError:
        have = len(jax.devices("cpu"))
        if have != num_devices:
            logging.warning(
                "JAX started before num_cpu_devices=%d could apply; using its %d CPU devices. "
                "Restart the kernel to change it.",
                num_devices,
                have,
            )


def make_mesh() -> Mesh:
    """A 1-D mesh over every device of every process, along `AXIS`."""
    return Mesh(np.asarray(jax.devices()), (AXIS,))


def sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading dimension across the mesh."""
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, P())


def is_main_process() -> bool:
    """Only process 0 prints, shows progress bars and writes files."""
    return jax.process_index() == 0
