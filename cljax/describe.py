"""What builds a program, as text: `describe(value)` changes whenever `value` would build a
different program, and `environment(devices)` whenever anything else a program depends on
changes. `cljax.programs` keys the programs it keeps on both.

A value is described whole: a function by its code, its defaults and every value its closure
holds; a dataclass (a model, a strategy, a buffer) by its fields; containers, arrays and
shardings by their contents. Functions and objects must come from cljax or from the
libraries it traces with (JAX, Flax, optax, NumPy), whose code the environment covers: cljax
by its source files and by its loaded modules as they stand (a function replaced at run
time counts), the libraries by their versions. Anything else (a model or strategy defined
in a notebook, whose code could change unseen) raises `Undescribable`.
"""

import dataclasses
import enum
import functools
import hashlib
import importlib.metadata
import os
import platform
import sys
import types
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The libraries whose functions and objects `describe` accepts, besides cljax and Python's
# builtins: `environment` covers their code by their versions.
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes")
DESCRIBED_PACKAGES = ("cljax", "builtins", *LIBRARIES)
_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_EMPTY_CELL = "<empty>"


class Undescribable(TypeError):
    """A value whose description could miss a change that alters the program."""


def describe(value) -> str:
    """A text that changes whenever `value` would build a different program; raises
    `Undescribable` for a value that it cannot vouch for."""
    return _Describer().text(value)


class _Describer:
    """One description: values met twice (shared, or in a cycle) are named by number."""

    def __init__(self):
        self._seen: dict[int, int] = {}
        self._alive: list = []  # keeps every described object's id unique meanwhile

    def text(self, value) -> str:
        if isinstance(value, _SCALARS):
            return f"{type(value).__name__}:{value!r}"
        if isinstance(value, np.dtype):
            return f"dtype:{value!r}"
        if isinstance(value, (np.generic, np.ndarray)):
            data = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
            return f"array:{value.dtype!r}:{value.shape}:{hashlib.sha256(data).hexdigest()}"
        if isinstance(value, type):
            _require_described_module(value.__module__, value)
            return f"type:{_qualified(value)}"
        seen = self._seen.get(id(value))
        if seen is not None:
            return f"@{seen}"
        self._seen[id(value)] = len(self._seen)
        self._alive.append(value)
        return self._composite(value)

    def _composite(self, value) -> str:
        name = _qualified(type(value))
        if isinstance(value, enum.Enum):
            return f"{name}.{value.name}"
        if isinstance(value, (Mesh, NamedSharding, PartitionSpec, jax.Device)):
            return sharding_text(value)
        if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
            return f"{name}{self.text(value.to_dict())}"
        if isinstance(value, (tuple, list)):
            fields = getattr(value, "_fields", None)  # a namedtuple names its items
            items = zip(fields, value, strict=True) if fields else enumerate(value)
            return f"{name}({','.join(f'{key}={self.text(item)}' for key, item in items)})"
        if isinstance(value, Mapping):
            items = sorted((self.text(key), self.text(item)) for key, item in value.items())
            return f"{name}{{{','.join(f'{key}:{item}' for key, item in items)}}}"
        if isinstance(value, (frozenset, set)):
            return f"{name}{{{','.join(sorted(self.text(item) for item in value))}}}"
        if isinstance(value, functools.partial):
            parts = (value.func, value.args, value.keywords)
            return f"partial({','.join(self.text(part) for part in parts)})"
        if isinstance(value, types.MethodType):
            return f"method({self.text(value.__self__)},{self.text(value.__func__)})"
        if isinstance(value, types.FunctionType):
            return self._function(value)
        if isinstance(value, (types.BuiltinFunctionType, np.ufunc)):
            _require_described_module(getattr(value, "__module__", None) or "numpy", value)
            return f"builtin:{value.__module__}.{value.__name__}"
        return self._object(value, name)

    def _function(self, function: types.FunctionType) -> str:
        _require_described_module(function.__module__, function)
        cells = tuple(_cell_contents(cell) for cell in function.__closure__ or ())
        defaults = (function.__defaults__, function.__kwdefaults__)
        return (
            f"function:{function.__module__}.{function.__qualname__}:{code_digest(function)}"
            f"{self.text(defaults)}{self.text(cells)}"
        )

    def _object(self, value, name: str) -> str:
        _require_described_module(type(value).__module__, value)
        if dataclasses.is_dataclass(value):
            fields = [
                (field.name, getattr(value, field.name)) for field in dataclasses.fields(value)
            ]
        elif hasattr(value, "__dict__") and (
            not callable(value) or isinstance(value, (jax.custom_jvp, jax.custom_vjp))
        ):
            fields = sorted(vars(value).items())
        else:  # a compiled function's options, say, are not in its attributes
            raise Undescribable(f"{name} keeps its state out of sight")
        return f"{name}({','.join(f'{key}={self.text(item)}' for key, item in fields)})"


def _cell_contents(cell: types.CellType):
    """What a closure's cell holds (a marker where it is still empty)."""
    try:
        return cell.cell_contents
    except ValueError:
        return _EMPTY_CELL


def _qualified(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _require_described_module(module: str | None, value) -> None:
    package = (module or "").partition(".")[0]
    if package not in DESCRIBED_PACKAGES:
        raise Undescribable(f"{value!r} comes from {module}, whose code is not fingerprinted")


def sharding_text(value: Mesh | NamedSharding | PartitionSpec | jax.Device) -> str:
    """A mesh, sharding, spec or device by the devices and axes it names."""
    if isinstance(value, jax.Device):
        return f"device:{value.platform}:{value.id}"
    if isinstance(value, Mesh):
        ids = value.device_ids.tolist()
        return f"mesh:{value.axis_names}:{value.axis_types}:{ids}"
    if isinstance(value, PartitionSpec):
        return f"spec:{value!r}"
    return f"named:{sharding_text(value.mesh)}:{value.spec!r}:{value.memory_kind}"


@functools.cache
def _code_digest(code: types.CodeType) -> str:
    return hashlib.sha256(_code_text(code).encode()).hexdigest()[:16]


def _code_text(code: types.CodeType) -> str:
    """What a code object does: its bytecode, constants (nested code included) and names.
    Not `marshal`, whose bytes depend on how many references each constant has."""
    parts = (
        code.co_qualname,
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags,
        code.co_code,
        tuple(_constant_text(constant) for constant in code.co_consts),
        code.co_names,
        code.co_varnames,
        code.co_freevars,
        code.co_cellvars,
    )
    return repr(parts)


def _constant_text(constant) -> str:
    """A code object's constant; a frozenset's items in order (their iteration order
    changes with the process's string hashing)."""
    if isinstance(constant, types.CodeType):
        return _code_text(constant)
    if isinstance(constant, tuple):
        return f"({','.join(map(_constant_text, constant))})"
    if isinstance(constant, frozenset):
        return f"frozenset({sorted(map(_constant_text, constant))})"
    return repr(constant)


def code_digest(function: types.FunctionType) -> str:
    """The digest of `function`'s code (its nested functions' included)."""
    return _code_digest(function.__code__)


def cljax_sources() -> str:
    """A digest of every cljax source file, imported yet or not."""
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, "rb") as file:
                    digest.update(f"{os.path.relpath(path, root)}\0".encode() + file.read())
    return digest.hexdigest()


def loaded_cljax() -> str:
    """A digest of every loaded cljax module's functions, classes and values as they are
    now: a module attribute replaced at run time (a patched function) changes it."""
    digest = hashlib.sha256()
    for name in sorted(name for name in sys.modules if name.partition(".")[0] == "cljax"):
        module = sys.modules[name]
        for attribute, value in sorted(vars(module).items()):
            digest.update(f"{name}.{attribute}={_attribute_text(value, name)};".encode())
    return digest.hexdigest()


def _attribute_text(value, module: str) -> str:
    """A module attribute: functions by their code, classes of this module by their own
    attributes, other values by `describe`; a callable it cannot describe by its identity,
    so that the cache never outlives it."""
    if isinstance(value, types.ModuleType):
        return f"module:{value.__name__}"
    if isinstance(value, (types.GenericAlias, types.UnionType)) or (
        type(value).__module__ == "typing"
    ):
        return f"typing:{value!r}"
    if isinstance(value, types.FunctionType):
        return f"function:{value.__module__}.{value.__qualname__}:{code_digest(value)}"
    if isinstance(getattr(value, "__wrapped__", None), types.FunctionType):  # jit, cache
        return f"{type(value).__name__}({_attribute_text(value.__wrapped__, module)})"
    if isinstance(value, type) and value.__module__ != module:  # walked in its own module
        return f"type:{_qualified(value)}"
    if isinstance(value, type):
        members = [
            f"{key}={_member_text(item)}"
            for key, item in sorted(vars(value).items())
            if _is_code(item) or not key.startswith("__")
        ]
        return f"class({','.join(members)})"
    try:
        return describe(value)
    except (Undescribable, RecursionError):
        return f"{type(value).__name__}@{id(value)}" if callable(value) else type(value).__name__


def _member_functions(value) -> list[types.FunctionType]:
    """The functions of a class attribute: a method (plain, static, class) or a property."""
    parts = [value, *(getattr(value, name, None) for name in ("__func__", "fget", "fset", "fdel"))]
    return [part for part in parts if isinstance(part, types.FunctionType)]


def _is_code(value) -> bool:
    return bool(_member_functions(value))


def _member_text(value) -> str:
    """A class attribute: methods and properties by their code, other values as module
    attributes are."""
    functions = _member_functions(value)
    if functions:
        return ":".join(code_digest(function) for function in functions)
    return _attribute_text(value, "")


def environment(devices: list[jax.Device]) -> str:
    """What every program depends on beyond its function and arguments."""
    versions = {package: importlib.metadata.version(package) for package in LIBRARIES}
    config = sorted((name, repr(value)) for name, value in jax.config.values.items())
    backend = devices[0].client
    return repr(
        (
            platform.python_version(),
            versions,
            config,
            os.environ.get("XLA_FLAGS", ""),
            backend.platform,
            backend.platform_version,
            [(device.id, device.device_kind, device.process_index) for device in devices],
            cljax_sources(),
            loaded_cljax(),
        )
    )
