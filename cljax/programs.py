"""Programs kept on disk and found by what builds them: a run from a warm cache neither
traces nor lowers them.

JAX's persistent compilation cache finds a compiled program by its lowered HLO, so every run
traces and lowers each program before it can look it up. Where steps are tiny that is a
large share of a run: Split MNIST's programs took 0.6 s to trace and lower on a 2-core CPU,
against 0.1 s to load from JAX's cache. `Programs` keeps each program exported
(`jax.export`: its StableHLO, serialized) under a key made of what builds it
(`cljax.describe`: the function with everything its closures hold, and the environment) and
of its arguments' tree, shapes, dtypes and shardings. A later run with the same key reads the
exported program back and compiles it through JAX's cache as before: the same program, the
same values bit for bit (tested), without tracing the Python that built it.

A program that cannot be described, or exported (arguments in host memory, or sharded over
another mesh), runs as plain `jax.jit`; so does one whose stored file does not read. The
folder holds one small file per program and may be deleted at any time.
"""

import contextlib
import hashlib
import importlib
import os
import pickle
import tempfile
import threading
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cljax.describe import Undescribable, describe, environment, sharding_text

SUFFIX = ".program"
SWITCH = "CLJAX_KEEP_PROGRAMS"  # "0": no programs kept, JAX's own cache as it is
# On a CPU, `jax.export`'s calls first set up LAPACK, which imports SciPy (0.1 s): imported
# in a thread from the start, beside the run's planning (not a daemon: an import cut short by
# the exit would print errors).
_CPU_CALL_IMPORTS = ("scipy.linalg.cython_lapack",)


def for_mesh(directory: str, mesh: Mesh) -> "Programs | None":
    """Programs kept in `directory` for a job of one process on `mesh`, where JAX's own
    persistent cache is on (programs read back compile through it) and `$CLJAX_KEEP_PROGRAMS`
    is not 0; else None."""
    if not (jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache):
        return None
    if os.environ.get(SWITCH, "1") == "0":
        return None
    if mesh.devices.flat[0].platform == "cpu":
        for module in _CPU_CALL_IMPORTS:
            threading.Thread(
                target=importlib.import_module, args=(module,), name=f"import-{module}"
            ).start()
    return Programs(directory, mesh)


class Programs:
    """Where a run's programs are kept: `jit(fn, **options)` is `jax.jit(fn, **options)`,
    exported to `directory` at its first call and read back by later runs."""

    def __init__(self, directory: str, mesh: Mesh):
        self.directory = directory
        self.mesh = mesh
        self.read = 0  # programs read back, and exported, by this run
        self.exported = 0
        self._environment: str | None = None  # at the first call, once the code is loaded

    def jit(self, fn: Callable, **options) -> "Program":
        return Program(self, fn, options)

    def path(self, function_text: str, signature_text: str) -> str:
        """The file of the program that `function_text` describes, for arguments of
        `signature_text`."""
        if self._environment is None:
            self._environment = environment(list(self.mesh.devices.flat))
        key = f"{self._environment}\n{function_text}\n{signature_text}".encode()
        return os.path.join(self.directory, hashlib.sha256(key).hexdigest() + SUFFIX)


class Program:
    """`jax.jit(fn, **options)` run as a program exported once and read back by later runs,
    one per argument signature (see the module docstring)."""

    def __init__(self, programs: Programs, fn: Callable, options: dict):
        self._programs = programs
        self._fn = fn
        self._options = options
        self._jitted = jax.jit(fn, **options)
        self._function_text: str | None = None  # "" where `fn` cannot be described
        self._calls: dict[tuple, tuple] = {}  # by signature: (call, output tree), or ()

    def __call__(self, *args):
        leaves, tree = jax.tree.flatten(args)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return self._jitted(*args)  # traced inside another program (`eval_shape`)
        signature = _signature(tree, leaves)
        exported = self._calls.get(signature)
        if exported is None:
            exported = self._calls[signature] = self._exported(signature, args)
        if not exported:
            return self._jitted(*args)
        call, out_tree = exported
        return out_tree.unflatten(call(*leaves))

    def trace(self, *args, **kwargs) -> jax.stages.Traced:
        """The plain program traced (the exported one's jaxpr is the same)."""
        return self._jitted.trace(*args, **kwargs)

    def lower(self, *args) -> jax.stages.Lowered:
        """The program that runs for arguments like `args`, lowered: the exported one where
        it has run (a profile's HLO is then that of the program it timed)."""
        leaves, tree = jax.tree.flatten(args)
        exported = self._calls.get(_signature(tree, leaves))
        if exported:
            return exported[0].lower(*leaves)
        return self._jitted.lower(*args)

    def _exported(self, signature: tuple, args: tuple) -> tuple:
        """The call of the exported program for arguments like `args` and its output tree:
        read back, or exported and stored; () where there can be none."""
        if self._function_text is None:
            try:
                self._function_text = describe((self._fn, self._options))
            except (Undescribable, RecursionError):
                self._function_text = ""
        if not self._function_text:
            return ()
        path = self._programs.path(self._function_text, _signature_text(signature))
        stored = _read(path)
        if stored is None:
            try:
                stored = self._export(args)
            except Exception:  # Unexportable, or what export refuses: plain jit, which
                return ()  # raises again whatever error is the program's own
            _write(path, *stored)
            self._programs.exported += 1
        else:
            self._programs.read += 1
        exported, out_tree = stored
        mesh = self._programs.mesh
        call = jax.jit(
            exported.call,
            in_shardings=exported.in_shardings_jax(mesh),
            out_shardings=list(exported.out_shardings_jax(mesh)),  # `call` returns a list
            donate_argnums=_leaf_indices(args, self._options.get("donate_argnums", ())),
            keep_unused=True,
        )
        return call, out_tree

    def _export(self, args: tuple) -> tuple[jax.export.Exported, jax.tree_util.PyTreeDef]:
        """The program exported over the leaves of `args`, and its output tree."""
        leaves, tree = jax.tree.flatten(args)
        out_trees = []

        def over_leaves(*flat_args):
            out_leaves, out_tree = jax.tree.flatten(self._jitted(*tree.unflatten(flat_args)))
            out_trees.append(out_tree)
            return out_leaves

        shapes = [_shape_on(leaf, self._programs.mesh) for leaf in leaves]
        shardings = [shape.sharding for shape in shapes]
        jitted = jax.jit(over_leaves, in_shardings=shardings, keep_unused=True)
        return jax.export.export(jitted)(*shapes), out_trees[0]


class Unexportable(ValueError):
    """An argument whose placement an exported program would not keep."""


def _shape_on(leaf, mesh: Mesh) -> jax.ShapeDtypeStruct:
    """An argument's type and its sharding over `mesh`. A value that JAX may place anywhere
    (from the host, or not committed to a device) is replicated; on a mesh of one device
    every sharding is one. Raises `Unexportable` for another mesh or a memory kind other
    than the device's, which an exported program does not keep."""
    aval = jax.typeof(leaf)
    placed = isinstance(leaf, jax.Array) and leaf.committed
    sharding = leaf.sharding if placed else NamedSharding(mesh, PartitionSpec())
    if mesh.devices.size == 1 and sharding.device_set == set(mesh.devices.flat):
        spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
        sharding = NamedSharding(mesh, spec, memory_kind=sharding.memory_kind)
    if not isinstance(sharding, NamedSharding) or sharding.mesh != mesh:
        raise Unexportable(f"an argument sharded as {sharding}, not over the run's mesh")
    if sharding.memory_kind not in (None, "device"):
        raise Unexportable(f"an argument in {sharding.memory_kind} memory")
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=sharding, weak_type=aval.weak_type)


def _leaf_indices(args: tuple, argnums: int | tuple[int, ...]) -> tuple[int, ...]:
    """The indices, among the leaves of `args`, of the leaves of the arguments `argnums`."""
    argnums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    indices, start = [], 0
    for index, arg in enumerate(args):
        count = len(jax.tree.leaves(arg))
        if index in argnums:
            indices.extend(range(start, start + count))
        start += count
    return tuple(indices)


def _signature(tree: jax.tree_util.PyTreeDef, leaves: list) -> tuple:
    """What a compiled call is kept by: the arguments' tree and each leaf's requirements."""
    return tree, tuple(_leaf_signature(leaf) for leaf in leaves)


def _leaf_signature(leaf) -> tuple:
    """What a program requires of an argument: its type and placement (on one device,
    where every sharding is the same, the device and memory kind only)."""
    if isinstance(leaf, jax.Array):
        sharding = leaf.sharding
        if len(sharding.device_set) == 1:
            sharding = (frozenset(sharding.device_set), sharding.memory_kind)
        return (leaf.shape, leaf.dtype, jax.typeof(leaf).weak_type, sharding, leaf.committed)
    array = np.asarray(leaf)
    return (type(leaf), array.shape, array.dtype)


def _signature_text(signature: tuple) -> str:
    tree, leaves = signature
    texts = [
        tuple(
            sharding_text(part) if isinstance(part, NamedSharding) else repr(part) for part in leaf
        )
        for leaf in leaves
    ]
    return f"{tree}{texts}"


def _read(path: str) -> tuple | None:
    """The exported program and output tree stored at `path`; None where there is none, or
    none that reads (a damaged file, removed)."""
    try:
        with open(path, "rb") as file:
            serialized, out_tree = pickle.load(file)
        return jax.export.deserialize(serialized), out_tree
    except FileNotFoundError:
        return None
    except Exception:  # whatever a damaged file raises: the program is exported again
        _remove(path)
        return None


def _write(path: str, exported: jax.export.Exported, out_tree) -> None:
    """Writes the exported program and its output tree to `path` whole or not at all; a
    folder that cannot be written only costs the next run its tracing."""
    temporary = None
    try:
        payload = pickle.dumps((exported.serialize(), out_tree))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as file:
            temporary = file.name
            file.write(payload)
        os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            _remove(temporary)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
