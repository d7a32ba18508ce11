"""The host side of a run: processes, devices, the mesh, and what crosses processes.

`create(distributed, num_cpu_devices)` starts the processes of a job once and returns a
`Runtime`, the host-side counterpart of `Collectives`: it owns the mesh, the per-device
wrapper, the collectives that per-device code uses, process index and count, barriers,
gathers and the watchdog (`cljax.watchdog`). It is the only place in cljax that knows which
communication backend runs:

- `jax` (`JaxRuntime`): `jax.distributed` when the job has several processes; one mesh over
  every device of every process, per-device code under `shard_map`.
- `mpi` (`MpiRuntime`): `mpirun` jobs with one device per process and no jax.distributed;
  each process runs the per-device code itself and reaches the others through mpi4jax.
"""

import abc
import itertools
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cljax import programs
from cljax.collectives import AXIS, Collectives, JaxCollectives, MpiCollectives, SingleDevice
from cljax.data import cache
from cljax.errors import ConfigError, warn
from cljax.watchdog import KeyValueLiveness, Watchdog

# Environment variables that give the number of processes of a job, by launcher, and the
# JAX cluster detection to use for it.
_CLUSTER_SIZE_VARIABLES = {
    "SLURM_NTASKS": None,
    "OMPI_COMM_WORLD_SIZE": None,
    "PMI_SIZE": "mpi4py",
    "PALS_NRANKS": "mpi4py",
}
PROGRAMS_FOLDER = "programs"
_CPU_COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"
_BROADCAST_PREFIX = "cljax/broadcast/"
_GATHER_PREFIX = "cljax/gather/"
# Numbers the key-value exchanges of this process (broadcasts, gathers), whichever runtime
# object makes them: every process makes the same ones in the same order, so the numbers
# agree, and a second run in one job (a notebook) reuses no key.
_exchange_numbers = itertools.count(1)


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
    def start(cls, distributed: Mapping, num_cpu_devices: int) -> "Runtime":
        """Sets up this process for the job and returns its runtime."""

    @abc.abstractmethod
    def per_device(self, fn: Callable, in_specs, out_specs) -> Callable:
        """`fn` as per-device code over the mesh axis."""

    def jit(self, fn: Callable, **options) -> Callable:
        """`jax.jit(fn, **options)` for a program of the run."""
        return jax.jit(fn, **options)

    def place(self, local: dict[str, np.ndarray], steps: bool = False) -> dict:
        """This process's rows of a global batch, on the mesh as global arrays; with
        `steps`, of several steps' batches stacked along a leading axis (split along the
        second).

        One call for all of them: in a job of one process that is one batched transfer,
        cheaper than one per array (README, "Parallelism").
        """
        sharding = NamedSharding(self.mesh, P(None, AXIS)) if steps else self.sharded
        return jax.make_array_from_process_local_data(sharding, local)

    def replicate(self, value: np.ndarray | np.generic) -> jax.Array:
        """A host value that every process holds alike, copied to every device of the mesh.

        A step's scalar arguments (task id, learning rate) placed this way once cost the
        steps that reuse them nothing; passed as host values, jit copies them to every
        device again at every call, through Python (README, "Parallelism").
        """
        value = np.asarray(value)
        return jax.make_array_from_callback(
            value.shape, self.replicated, lambda index: value[index]
        )

    def memory_kinds(self) -> list[str]:
        """The kinds of memory this process's devices have (device, pinned_host, ...)."""
        return [memory.kind for memory in self.mesh.local_devices[0].addressable_memories()]

    def memory_per_device(self, memory_kind: str) -> tuple[int, str]:
        """Bytes a device can hold in `memory_kind`, and what that memory is: the
        accelerator's own, or host memory shared by this process's devices."""
        device = self.mesh.local_devices[0]
        stats = device.memory_stats() if memory_kind == "device" else None
        if stats and "bytes_limit" in stats:
            return int(stats["bytes_limit"]), f"{device.device_kind} memory"
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        local = jax.local_device_count()
        return host // local, f"host memory per device ({local} on this host)"

    @abc.abstractmethod
    def gather_rows(self, local_rows: jax.Array) -> np.ndarray:
        """Every process's rows of a batch-sharded array, concatenated in process order."""

    @abc.abstractmethod
    def max_over_processes(self, values: np.ndarray) -> np.ndarray:
        """Element-wise maximum of `values` over all processes."""

    @abc.abstractmethod
    def barrier(self, name: str) -> None:
        """Waits until every process of the job gets here."""

    @abc.abstractmethod
    def broadcast_text(self, text: str | None) -> str:
        """Process 0's `text`, on every process."""

    def cores_of_this_process(self) -> int:
        """This process's share of the cores it may run on: all of them if it was bound to
        its own (as `srun --cpus-per-task` does), else an even share with the job's other
        processes on this machine that may run on the same ones."""
        cores = sorted(os.sched_getaffinity(0))
        place = f"{socket.gethostname()} {cores}"
        return max(1, len(cores) // self.all_texts(place).count(place))

    def all_texts(self, text: str) -> list[str]:
        """Every process's `text`, in process order; every process must call it."""
        if self.process_count == 1:
            return [text]
        return self._gather_texts(text)

    @abc.abstractmethod
    def _gather_texts(self, text: str) -> list[str]:
        """`all_texts` of a job of several processes."""

    #: Whether every process takes part in writing a global array (one JAX program over
    #: all processes); else each process is a JAX program of its own.
    writes_together = True

    def checkpoint_directory(self, root: str) -> str:
        """Where this process's checkpoints go: `root`, shared by all processes (each
        writes its own shards of the global arrays)."""
        return root

    def watchdog(self, what: str = "training") -> Watchdog:
        """A watchdog for this job: armed only when there are other processes to lose."""
        return Watchdog(self.timeout_s, self.process_index, what, active=self.process_count > 1)


class JaxRuntime(Runtime):
    """One mesh over every device of every process (or over `devices`); collectives of
    `jax.lax`. On a mesh of one device, per-device code runs under plain `jax.jit` with
    collectives that do nothing: XLA:CPU keeps a one-device all-reduce as a rendezvous of
    one thread (the Split MNIST step ran about 0.1 ms slower per all-reduce set, its
    first-task tracing 0.06 s slower) and the values are the same bit for bit (tested)."""

    def __init__(self, timeout_s: float, devices: list[jax.Device] | None = None):
        mesh = Mesh(np.asarray(devices or jax.devices()), (AXIS,))
        collectives = SingleDevice() if mesh.devices.size == 1 else JaxCollectives()
        super().__init__(mesh, collectives, timeout_s)
        folder = os.path.join(cache.cache_dir(), PROGRAMS_FOLDER)
        self.programs = programs.for_mesh(folder, mesh) if self.process_count == 1 else None

    def jit(self, fn: Callable, **options) -> Callable:
        """In a job of one process where JAX's persistent compilation cache is on, a program
        kept in `$CLJAX_CACHE_DIR/programs` (`cljax.programs`): a run from a warm cache
        neither traces nor lowers it."""
        if self.programs is None:
            return super().jit(fn, **options)
        return self.programs.jit(fn, **options)

    @classmethod
    def start(cls, distributed: Mapping, num_cpu_devices: int) -> "JaxRuntime":
        """On CPU, `num_cpu_devices` devices for the whole job, split evenly over its
        processes; jax.distributed when the job has several processes."""
        processes = distributed.num_processes or launched_processes()[0]
        per_process = max(1, num_cpu_devices // processes)
        configure_cpu_devices(per_process, distributed.timeout_s)
        _initialize_jax_distributed(distributed)
        if jax.default_backend() == "cpu" and per_process * processes != num_cpu_devices:
            raise ConfigError(
                f"num_cpu_devices={num_cpu_devices} cannot be split evenly over"
                f" {processes} processes; set --config.num_cpu_devices to a multiple of"
                f" {processes}"
            )
        return cls(distributed.timeout_s)

    def broadcast_text(self, text: str | None) -> str:
        """Through the coordinator's key-value store, under a key numbered by call: a
        process that reads late still gets the text of the same call."""
        if self.process_count == 1:
            return text
        client = _key_value_store()
        key = f"{_BROADCAST_PREFIX}{next(_exchange_numbers)}"
        if self.is_main:
            client.key_value_set(key, text)
            return text
        return client.blocking_key_value_get(key, int(self.timeout_s * 1000))

    def _gather_texts(self, text: str) -> list[str]:
        """Through the coordinator's key-value store, under keys numbered by call."""
        client = _key_value_store()
        prefix = f"{_GATHER_PREFIX}{next(_exchange_numbers)}/"
        client.key_value_set(f"{prefix}{self.process_index}", text)
        timeout = int(self.timeout_s * 1000)
        return [
            client.blocking_key_value_get(f"{prefix}{index}", timeout)
            for index in range(self.process_count)
        ]

    def watchdog(self, what: str = "training") -> Watchdog:
        """With several processes, each watchdog also posts that its process is alive, so
        that a stalled process can name the one that went silent."""
        watchdog = super().watchdog(what)
        if self.process_count > 1:
            watchdog.liveness = KeyValueLiveness(
                _key_value_store(), self.process_index, self.process_count
            )
        return watchdog

    @property
    def process_index(self) -> int:
        return jax.process_index()

    @property
    def process_count(self) -> int:
        return jax.process_count()

    def per_device(self, fn: Callable, in_specs, out_specs) -> Callable:
        if isinstance(self.collectives, SingleDevice):  # a mesh of one device (`__init__`)
            return fn
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)

    def gather_rows(self, local_rows: jax.Array) -> np.ndarray:
        """In a job of one process, the array itself: `process_allgather` would run a
        program of its own (about 5 ms per evaluation on a CPU)."""
        if self.process_count == 1:
            return np.asarray(local_rows)
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
    def start(cls, distributed: Mapping, num_cpu_devices: int) -> "MpiRuntime":
        """One device per process, whatever `num_cpu_devices` says."""
        configure_cpu_devices(1, distributed.timeout_s)
        runtime = cls(distributed.timeout_s)
        if runtime.process_count == 1 and launched_processes()[0] == 1:
            warn(
                "distributed.backend='mpi' outside mpirun: training on this process's one"
                " device; launch with launch/mpirun.sh N, or use distributed.backend=jax"
            )
        return runtime

    def broadcast_text(self, text: str | None) -> str:
        return self._comm.bcast(text, root=0)

    writes_together = False

    def checkpoint_directory(self, root: str) -> str:
        """`root/process_<i>`: each process is a JAX program of its own, its device's
        part of the global buffer a checkpoint of its own."""
        return os.path.join(root, f"process_{self.process_index}")

    def _gather_texts(self, text: str) -> list[str]:
        return self._comm.allgather(text)

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


def create(distributed: Mapping, num_cpu_devices: int) -> Runtime:
    """Starts this process's part of the job described by a config's `distributed` section
    (and, on CPU, its `num_cpu_devices`)."""
    return BACKENDS[distributed.backend].start(distributed, num_cpu_devices)


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


def _initialize_jax_distributed(distributed: Mapping) -> None:
    """Starts multi-process JAX (`jax.distributed`) when the job has several processes.

    Explicit `coordinator_address`/`num_processes`/`process_id` win; otherwise Slurm and
    Open MPI are detected by JAX, and MPICH/PALS (mpiexec) through mpi4py. A single process
    needs nothing. On CPU, collectives across processes use gloo.
    """
    explicit = distributed.coordinator_address is not None
    launched, detection = launched_processes()
    if (not explicit and launched == 1) or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's own heartbeat check aborts every process with a long crash dump once a process
    # has sent no heartbeat for heartbeat_timeout_seconds. Heartbeats go every half of that
    # (measured on jaxlib 0.10: aborts came 23 to 40 s after a kill with 40 s, 59 to 63 s
    # with 80 s), so the first abort can come half of it after a death. Half is set to
    # 2 timeout_s + 10, well after the watchdog (timeout_s), which names the lost process.
    timeouts = {
        "initialization_timeout": distributed.timeout_s,
        "heartbeat_timeout_seconds": 4 * distributed.timeout_s + 20,
        "shutdown_timeout_seconds": distributed.timeout_s,
    }
    print(
        f"cljax: joining a job of {distributed.num_processes or launched} processes"
        f" (distributed.timeout_s={distributed.timeout_s})",
        file=sys.stderr,
        flush=True,
    )
    if explicit:
        jax.distributed.initialize(
            distributed.coordinator_address,
            distributed.num_processes,
            distributed.process_id,
            **timeouts,
        )
    else:
        jax.distributed.initialize(cluster_detection_method=detection, **timeouts)


def _key_value_store():
    """The client of jax.distributed's key-value store. JAX (0.10) gives it no public
    handle; its own `multihost_utils` reaches it the same way."""
    from jax._src import distributed

    return distributed.global_state.client
