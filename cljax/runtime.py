"""The host side of a run: processes, devices, the mesh, and what crosses processes.

`create(config)` starts the processes of a job once and returns a `Runtime`, the host-side
counterpart of `Collectives`: it owns the mesh, the per-device wrapper, the collectives that
per-device code uses, process index and count, barriers, gathers and the watchdog. It is the
only place in cljax that knows which communication backend runs:

- `jax` (`JaxRuntime`): `jax.distributed` when the job has several processes; one mesh over
  every device of every process, per-device code under `shard_map`.
- `mpi` (`MpiRuntime`): `mpirun` jobs with one device per process and no jax.distributed;
  each process runs the per-device code itself and reaches the others through mpi4jax.
"""

import abc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cljax.collectives import AXIS, Collectives, JaxCollectives, MpiCollectives

# Environment variables that give the number of processes of a job, by launcher, and the
# JAX cluster detection to use for it.
_CLUSTER_SIZE_VARIABLES = {
    "SLURM_NTASKS": None,
    "OMPI_COMM_WORLD_SIZE": None,
    "PMI_SIZE": "mpi4py",
    "PALS_NRANKS": "mpi4py",
}
_CPU_COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"


class Runtime(abc.ABC):
    """What the host side of a run may ask of the devices and of the other processes."""

    def __init__(self, mesh: Mesh, collectives: Collectives, timeout_s: float):
        self.mesh = mesh
        self.collectives = collectives
        self.timeout_s = timeout_s

    @property
    @abc.abstractmethod
    def process_index(self) -> int: ...

    @property
    @abc.abstractmethod
    def process_count(self) -> int: ...

    @property
    def num_devices(self) -> int:
        """Devices taking part in data parallelism, across all processes."""
        return self.mesh.devices.size * self._processes_per_mesh

    @property
    def _processes_per_mesh(self) -> int:
        """How many processes' meshes make up the data-parallel devices."""
        return 1

    @property
    def is_main(self) -> bool:
        """Only process 0 prints, shows progress bars and writes files."""
        return self.process_index == 0

    @property
    def sharded(self) -> NamedSharding:
        """Splits the leading dimension across the mesh."""
        return NamedSharding(self.mesh, P(AXIS))

    @property
    def replicated(self) -> NamedSharding:
        """A full copy on every device."""
        return NamedSharding(self.mesh, P())

    @classmethod
    @abc.abstractmethod
    def start(cls, config: ml_collections.ConfigDict) -> "Runtime":
        """Sets up this process for the job and returns its runtime."""

    @abc.abstractmethod
    def per_device(self, fn: Callable, in_specs, out_specs) -> Callable:
        """`fn` as per-device code over the mesh axis."""

    def place(self, local: dict[str, np.ndarray]) -> dict:
        """This process's rows of a global batch, on the mesh as global arrays."""
        return {
            key: jax.make_array_from_process_local_data(
                self.sharded, value, (len(value) * jax.process_count(), *value.shape[1:])
            )
            for key, value in local.items()
        }

    @abc.abstractmethod
    def gather_rows(self, local_rows: jax.Array) -> np.ndarray:
        """Every process's rows of a batch-sharded array, concatenated in process order."""

    @abc.abstractmethod
    def max_over_processes(self, values: np.ndarray) -> np.ndarray:
        """Element-wise maximum of `values` over all processes."""

    @abc.abstractmethod
    def barrier(self, name: str) -> None:
        """Waits until every process of the job gets here."""

    def watchdog(self, what: str = "training") -> "Watchdog":
        """A watchdog for this job: armed only when there are other processes to lose."""
        return Watchdog(self.timeout_s, self.process_index, what, active=self.process_count > 1)


class JaxRuntime(Runtime):
    """One mesh over every device of every process; collectives of `jax.lax`."""

    def __init__(self, timeout_s: float):
        super().__init__(Mesh(np.asarray(jax.devices()), (AXIS,)), JaxCollectives(), timeout_s)

    @classmethod
    def start(cls, config: ml_collections.ConfigDict) -> "JaxRuntime":
        """`config.num_cpu_devices` devices per process on CPU; jax.distributed if needed."""
        configure_cpu_devices(config.num_cpu_devices, config.distributed.timeout_s)
        _initialize_jax_distributed(config.distributed)
        return cls(config.distributed.timeout_s)

    @property
    def process_index(self) -> int:
        return jax.process_index()

    @property
    def process_count(self) -> int:
        return jax.process_count()

    def per_device(self, fn: Callable, in_specs, out_specs) -> Callable:
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)

    def gather_rows(self, local_rows: jax.Array) -> np.ndarray:
        return np.asarray(multihost_utils.process_allgather(local_rows, tiled=True))

    def max_over_processes(self, values: np.ndarray) -> np.ndarray:
        """Never below this process's own values, although JAX gathers them as float32."""
        if self.process_count == 1:
            return values
        return np.maximum(values, multihost_utils.process_allgather(values).max(axis=0))

    def barrier(self, name: str) -> None:
        if self.process_count > 1:
            multihost_utils.sync_global_devices(name)


class MpiRuntime(Runtime):
    """One device per process; the process is the device, mpi4jax its collectives."""

    def __init__(self, timeout_s: float):
        from mpi4py import MPI

        self._comm = MPI.COMM_WORLD
        mesh = Mesh(np.asarray(jax.local_devices()[:1]), (AXIS,))
        super().__init__(mesh, MpiCollectives(self._comm), timeout_s)

    @classmethod
    def start(cls, config: ml_collections.ConfigDict) -> "MpiRuntime":
        """One device per process, whatever `num_cpu_devices` says."""
        configure_cpu_devices(1, config.distributed.timeout_s)
        return cls(config.distributed.timeout_s)

    @property
    def process_index(self) -> int:
        return self._comm.Get_rank()

    @property
    def process_count(self) -> int:
        return self._comm.Get_size()

    @property
    def _processes_per_mesh(self) -> int:
        return self.process_count

    def per_device(self, fn: Callable, in_specs, out_specs) -> Callable:
        return fn

    def gather_rows(self, local_rows: jax.Array) -> np.ndarray:
        return np.concatenate(self._comm.allgather(np.asarray(local_rows)))

    def max_over_processes(self, values: np.ndarray) -> np.ndarray:
        return np.max(self._comm.allgather(values), axis=0)

    def barrier(self, name: str) -> None:
        self._comm.Barrier()


BACKENDS: dict[str, type[Runtime]] = {"jax": JaxRuntime, "mpi": MpiRuntime}


def create(config: ml_collections.ConfigDict) -> Runtime:
    """Starts this process's part of the job described by `config.distributed`."""
    return BACKENDS[config.distributed.backend].start(config)


def configure_cpu_devices(num_devices: int, collective_timeout_s: int | None = None) -> None:
    """Asks the CPU backend for `num_devices` simulated devices (per process).

    Simulated devices are threads; on a busy machine one can reach a collective long after
    the others, and XLA aborts after 40 s by default. `collective_timeout_s` raises that
    limit (unless XLA_FLAGS already sets it). Must run before JAX starts a backend. In a
    notebook where JAX already started, the existing devices are kept and a warning says how
    many there are.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if collective_timeout_s is not None and _CPU_COLLECTIVE_TIMEOUT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = (
            f"{flags} {_CPU_COLLECTIVE_TIMEOUT_FLAG}={collective_timeout_s}".strip()
        )
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


def launched_processes() -> tuple[int, str | None]:
    """How many processes the launcher started, and the JAX cluster detection to use."""
    for variable, detection in _CLUSTER_SIZE_VARIABLES.items():
        if int(os.environ.get(variable, "1")) > 1:
            return int(os.environ[variable]), detection
    return 1, None


def _initialize_jax_distributed(config: ml_collections.ConfigDict) -> None:
    """Starts multi-process JAX (`jax.distributed`) when the job has several processes.

    Explicit `coordinator_address`/`num_processes`/`process_id` win; otherwise Slurm and
    Open MPI are detected by JAX, and MPICH/PALS (mpiexec) through mpi4py. A single process
    needs nothing. On CPU, collectives across processes use gloo.
    """
    explicit = config.coordinator_address is not None
    launched, detection = launched_processes()
    if (not explicit and launched == 1) or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = {
        "initialization_timeout": config.timeout_s,
        "heartbeat_timeout_seconds": config.timeout_s,
        "shutdown_timeout_seconds": config.timeout_s,
    }
    print(
        f"cljax: joining a job of {config.num_processes or launched} processes"
        f" (distributed.timeout_s={config.timeout_s})",
        file=sys.stderr,
        flush=True,
    )
    if explicit:
        jax.distributed.initialize(
            config.coordinator_address, config.num_processes, config.process_id, **timeouts
        )
    else:
        jax.distributed.initialize(cluster_detection_method=detection, **timeouts)


class Watchdog:
    """Stops the process with a clear message when no progress is reported for `timeout_s`.

    In a multi-process run, a process that died or cannot be reached leaves the others
    blocked in a collective; the watchdog turns that hang into an exit with status 3. It
    arms at the first reported progress, so that compiling the first step (which can take
    long for a large model) never counts; until then JAX's start-up timeout and heartbeats
    stand guard. An inactive watchdog (a single process) does nothing.
    """

    EXIT_STATUS = 3

    def __init__(
        self, timeout_s: float, process_index: int = 0, what: str = "training", active=True
    ):
        self.timeout_s = timeout_s
        self.process_index = process_index
        self.what = what
        self.active = active
        self._last: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def progress(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            if self._last is None:
                continue
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                print(
                    f"cljax: process {self.process_index} made no {self.what} progress for"
                    f" {idle:.0f} s (distributed.timeout_s={self.timeout_s}): another process"
                    " probably died or cannot be reached; stopping",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(self.EXIT_STATUS)

    def __enter__(self) -> "Watchdog":
        if self.active:
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
