"""Process and device start-up, the data-parallel mesh, and a watchdog against hangs.

All start-up that depends on where cljax runs lives here, so the rest of the code only
ever sees a `jax.sharding.Mesh` with one axis, `AXIS`, over every device of every process.
"""

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

# The communication backend of this process, set by `initialize`: "jax" or "mpi".
_backend = "jax"

# Environment variables that give the number of processes of a job, by launcher.
_CLUSTER_SIZE_VARIABLES = {
    "SLURM_NTASKS": None,
    "OMPI_COMM_WORLD_SIZE": None,
    "PMI_SIZE": "mpi4py",
    "PALS_NRANKS": "mpi4py",
}


_CPU_COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"


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


def initialize(config: ml_collections.ConfigDict) -> None:
    """Sets up the processes of the job for `config.backend`.

    `jax`: starts multi-process JAX (`jax.distributed`) when the job has several processes.
    Explicit `coordinator_address`/`num_processes`/`process_id` win; otherwise Slurm and
    Open MPI are detected by JAX, and MPICH/PALS (mpiexec) through mpi4py. A single process
    needs nothing. On CPU, collectives across processes use gloo.
    `mpi`: no jax.distributed; each process drives one device and talks through mpi4jax.
    """
    global _backend
    _backend = config.backend
    if _backend == "mpi":
        return
    explicit = config.coordinator_address is not None
    launched, detection = launched_processes()
    if not explicit and launched == 1:
        return
    if jax.distributed.is_initialized():
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


def make_mesh() -> Mesh:
    """A 1-D mesh along `AXIS`: every device of every process (`jax`), or this process's
    one device (`mpi`)."""
    devices = jax.local_devices()[:1] if _backend == "mpi" else jax.devices()
    return Mesh(np.asarray(devices), (AXIS,))


def num_data_parallel(mesh: Mesh) -> int:
    """Devices taking part in data parallelism, across all processes."""
    return mesh.devices.size * (process_count() if _backend == "mpi" else 1)


def collectives() -> Collectives:
    """The collectives of this job's backend, for per-device code."""
    return MpiCollectives() if _backend == "mpi" else JaxCollectives()


def per_device(fn: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
    """`fn` as per-device code: `shard_map` over the mesh (`jax`), or as it is (`mpi`, where
    each process holds one device and the process is the device)."""
    if _backend == "mpi":
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def process_index() -> int:
    if _backend == "mpi":
        return _comm().Get_rank()
    return jax.process_index()


def process_count() -> int:
    if _backend == "mpi":
        return _comm().Get_size()
    return jax.process_count()


def gather_rows(local_rows: jax.Array) -> np.ndarray:
    """Every process's rows of a batch-sharded array, concatenated in process order."""
    if _backend == "mpi":
        return np.concatenate(_comm().allgather(np.asarray(local_rows)))
    return np.asarray(multihost_utils.process_allgather(local_rows, tiled=True))


def barrier(name: str) -> None:
    """Waits until every process of the job gets here."""
    if process_count() == 1:
        return
    if _backend == "mpi":
        _comm().Barrier()
    else:
        multihost_utils.sync_global_devices(name)


def max_over_processes(values: np.ndarray) -> np.ndarray:
    """Element-wise maximum of `values` over all processes (never below this process's own
    values, although JAX gathers them as float32)."""
    if process_count() == 1:
        return values
    if _backend == "mpi":
        return np.max(_comm().allgather(values), axis=0)
    return np.maximum(values, multihost_utils.process_allgather(values).max(axis=0))


def _comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading dimension across the mesh."""
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, P())


def is_main_process() -> bool:
    """Only process 0 prints, shows progress bars and writes files."""
    return process_index() == 0


class Watchdog:
    """Stops the process with a clear message when no progress is reported for `timeout_s`.

    In a multi-process run, a process that died or cannot be reached leaves the others
    blocked in a collective; the watchdog turns that hang into an exit with status 3. It
    arms at the first reported progress, so that compiling the first step (which can take
    long for a large model) never counts; until then JAX's start-up timeout and heartbeats
    stand guard.
    """

    EXIT_STATUS = 3

    def __init__(self, timeout_s: float, what: str = "training"):
        self.timeout_s = timeout_s
        self.what = what
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
                    f"cljax: process {process_index()} made no {self.what} progress for"
                    f" {idle:.0f} s (distributed.timeout_s={self.timeout_s}): another process"
                    " probably died or cannot be reached; stopping",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(self.EXIT_STATUS)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def __enter__(self) -> "Watchdog":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
