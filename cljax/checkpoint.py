"""Orbax checkpoints of a run, so that rerunning the same command continues it unchanged.

A checkpoint holds everything the next step depends on: the train state (parameters,
optimizer and strategy state, BatchNorm statistics, PRNG key), the rehearsal state (the
sharded buffer and the representatives drawn for the next step, in their memory kind), and
`progress`, a JSON document with the data position (task, epoch, step: the input pipeline's
order is a pure function of it), the results so far and the resolved config. Checkpoints
live in `<workdir>/checkpoints/<n>/`, n being the training steps done in the run; Orbax
writes them in the background (training goes on) into a temporary directory renamed when
complete, so a crash mid-write leaves the previous ones usable, and keeps the last
`checkpoint.keep`.

Resuming on another number of devices re-partitions the buffer (`cljax.buffer.repartition`).
"""

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from cljax import configuration, fingerprint, steps
from cljax.buffer import BufferState, RehearsalState, repartition
from cljax.data.pipeline import Position
from cljax.errors import ConfigError, warn
from cljax.runtime import Runtime

DIRECTORY = "checkpoints"
MODEL_DIRECTORY = "final_model"
# Fields that change nothing a run computes, so a resumed run may set them differently.
NEUTRAL_FIELDS = (
    "num_cpu_devices",
    "distributed.",
    "checkpoint.",
    "logging.",
    "dataset.worker_count",
    "dataset.workers",
    "dataset.prefetch_depth",
    "dataset.data_dir",
    "dataset.path",
    "buffer.memory_kind",
    "steps_per_dispatch",
)
# Derived from the number of devices, which a resumed run may change.
PER_DEVICE_FIELDS = ("buffer.budget_per_class", "buffer.total_slots")
# The progress document's SHA-256 is kept in it: Orbax's array files have checksums of their
# own (TensorStore's OCDBT stops with DATA_LOSS on a damaged one), a JSON document has none.
DIGEST = "digest"
# The arrays' fingerprints (`cljax.fingerprint`), kept in the progress document.
FINGERPRINTS = "fingerprints"


@dataclasses.dataclass
class Restored:
    """A checkpoint read back: the states, where the run stood, and its results so far."""

    step: int
    state: steps.TrainState
    rehearsal: RehearsalState | None
    position: Position
    progress: dict


class Checkpoints:
    """The checkpoints of one run (see the module docstring); every process takes part."""

    def __init__(self, workdir: str, runtime: Runtime, keep: int):
        self.runtime = runtime
        self.root = os.path.abspath(os.path.join(workdir, DIRECTORY))
        self.path = runtime.checkpoint_directory(self.root)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.path, options=options, handler_registry=_handlers()
        )

    def save(self, step: int, state, rehearsal, position: Position, progress: dict) -> None:
        """Starts writing checkpoint `step` in the background (waiting for the previous)."""
        recorded = fingerprint.fingerprints_of_items(
            {"state": state, "rehearsal": rehearsal}, self._add_over_processes
        )
        document = {
            **progress,
            "position": dataclasses.asdict(position),
            FINGERPRINTS: recorded,
        }
        items = {
            "state": ocp.args.StandardSave(state),
            "progress": ocp.args.JsonSave({**document, DIGEST: _digest(document)}),
        }
        if rehearsal is not None:
            items["rehearsal"] = ocp.args.StandardSave(rehearsal)
        if step in self.manager.all_steps():  # unreadable: the run resumed from an older one
            self.manager.delete(step)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        """Returns once every checkpoint started is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def restore_latest(
        self, abstract_states: Callable[[], tuple], check: Callable[[dict], None]
    ) -> Restored | None:
        """The newest readable checkpoint (None if there is none), restored onto this run's
        devices, into the train and rehearsal states `abstract_states()` describes (traced
        only when there is a checkpoint), once `check` accepted its progress document; an
        unreadable checkpoint is named in one line and the one before it is used."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        abstract_state, abstract_rehearsal = abstract_states()
        for step in steps:
            try:
                return self._restore(step, abstract_state, abstract_rehearsal, check)
            except (OSError, ValueError, KeyError, TypeError) as error:
                if isinstance(error, ConfigError):
                    raise
                warn(
                    f"checkpoint {self.path}/{step} is damaged or cannot be read"
                    f" ({_first_line(error)}); using the one before"
                )
        return None

    def _restore(self, step: int, abstract_state, abstract_rehearsal, check) -> Restored:
        progress = self.manager.restore(
            step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())
        )["progress"]
        if progress.pop(DIGEST, None) != _digest(progress):
            raise DamagedCheckpoint("its progress document differs from the one saved")
        check(progress)
        recorded = progress.pop(FINGERPRINTS)
        state = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )["state"]
        _verify("state", fingerprint.fingerprints(state, self._add_over_processes), recorded)
        position = Position(**progress.pop("position"))
        rehearsal = None
        if abstract_rehearsal is not None:
            saved_devices = progress["num_devices"]
            if saved_devices == self.runtime.num_devices:
                rehearsal = self.manager.restore(
                    step,
                    args=ocp.args.Composite(rehearsal=ocp.args.StandardRestore(abstract_rehearsal)),
                )["rehearsal"]
                found = fingerprint.fingerprints(rehearsal, self._add_over_processes)
                _verify("rehearsal", found, recorded)
            else:
                rehearsal = self._restore_repartitioned(
                    step, abstract_rehearsal, saved_devices, recorded
                )
        return Restored(step, state, rehearsal, position, progress)

    def _add_over_processes(self, values: np.ndarray) -> np.ndarray:
        """`values` summed over the processes that write the checkpoint together (a process
        of distributed.backend=mpi writes one of its own)."""
        if self.runtime.process_count == 1 or not self.runtime.writes_together:
            return values
        texts = self.runtime.all_texts(json.dumps([int(value) for value in values]))
        return np.sum([np.asarray(json.loads(text), np.uint64) for text in texts], axis=0)

    def _restore_repartitioned(self, step: int, abstract, saved_devices: int, recorded: dict):
        """The buffer of a run saved on `saved_devices` devices, re-partitioned by class onto
        this run's (every process reads it whole); the representatives start empty."""
        if not self.runtime.writes_together:
            raise ConfigError(
                f"{self.root} was saved by {saved_devices} processes of distributed.backend=mpi;"
                " resume it on as many, or resume a distributed.backend=jax run instead"
            )
        saved = _as_numpy(self.manager, step, "rehearsal")
        _verify("rehearsal", fingerprint.of_numpy(saved), recorded)
        old = saved["buffer"]
        num_classes = old["counts"].shape[0] // saved_devices
        buffer = repartition(
            BufferState(**old),
            saved_devices,
            self.runtime.num_devices,
            num_classes,
            abstract.buffer.task_ids.shape[1],
            step,
        )
        representatives = jax.tree.map(
            lambda meta: np.zeros(meta.shape, meta.dtype), abstract.representatives
        )
        return jax.tree.map(
            lambda value, meta: _place(value, meta.sharding),
            RehearsalState(buffer, representatives),
            abstract,
        )


def read(workdir: str, item: str, step: int | None = None) -> dict:
    """Item `state` or `rehearsal` of checkpoint `step` (None: the latest) of the run in
    `workdir`, as nested dicts of NumPy arrays, whatever devices it was saved on."""
    path = os.path.abspath(os.path.join(workdir, DIRECTORY))
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(path, options=options, handler_registry=_handlers()) as manager:
        return _as_numpy(manager, manager.latest_step() if step is None else step, item)


def _as_numpy(manager: ocp.CheckpointManager, step: int, item: str) -> dict:
    saved = manager.item_metadata(step)[item].tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
    arguments = {item: ocp.args.PyTreeRestore(restore_args=as_numpy)}
    return manager.restore(step, args=ocp.args.Composite(**arguments))[item]


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files were changed after they were saved."""


def _verify(item: str, found: dict[str, int], recorded: dict[str, dict[str, int]]) -> None:
    """Refuses arrays whose fingerprints differ from those recorded at the save."""
    changed = [name for name, value in found.items() if recorded[item].get(name) != value]
    if changed:
        raise DamagedCheckpoint(f"{item} array {changed[0]} differs from the one saved")


def _digest(document: dict) -> str:
    """The SHA-256 of a JSON document, its keys sorted."""
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _first_line(error: Exception) -> str:
    """The start of `error`'s message (Orbax's run to many lines), or its type's name."""
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def _handlers() -> ocp.handlers.CheckpointHandlerRegistry:
    """The handler of every item, so that one item can be restored without the others."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for name in ("state", "rehearsal"):
        registry.add(name, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
        registry.add(name, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    for name in ("state", "rehearsal"):
        registry.add(name, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
    registry.add("progress", ocp.args.JsonSave, ocp.JsonCheckpointHandler)
    registry.add("progress", ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    return registry


def _place(value: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def changed_fields(saved: dict, current: dict, same_devices: bool) -> list[str]:
    """The dotted config fields whose values differ in a way that changes results."""
    ignored = NEUTRAL_FIELDS if same_devices else NEUTRAL_FIELDS + PER_DEVICE_FIELDS
    old, new = configuration.flat_fields(saved), configuration.flat_fields(current)
    return sorted(
        field
        for field in old.keys() | new.keys()
        if old.get(field) != new.get(field)
        and not any(field == n or (n.endswith(".") and field.startswith(n)) for n in ignored)
    )


def check_same_config(saved: dict, current: dict, same_devices: bool, where: str) -> None:
    """A `ConfigError` naming the fields in which `current` departs from the run in `where`."""
    fields = changed_fields(saved, current, same_devices)
    if fields:
        _flat_saved = configuration.flat_fields(saved)
        _flat_current = configuration.flat_fields(current)
        shown = ", ".join(
            f"{field} ({_flat_saved.get(field)!r} -> {_flat_current.get(field)!r})"
            for field in fields[:4]
        )
        raise ConfigError(
            f"{where} holds a run whose config differs in {shown}"
            f"{' and more' if len(fields) > 4 else ''}; rerun with its config or pass a new"
            " --workdir"
        )


def export_model(workdir: str, state: steps.TrainState, runtime: Runtime) -> str:
    """Writes the final parameters and model state (BatchNorm statistics) to
    `<workdir>/final_model`, the directory `init_from` takes; returns its path. They are
    replicated, so where processes do not write together process 0 writes them alone."""
    path = os.path.abspath(os.path.join(workdir, MODEL_DIRECTORY))
    if runtime.writes_together or runtime.is_main:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, {"params": state.params, "model_state": state.model_state})
    return path


def load_model(path: str, state: steps.TrainState) -> steps.TrainState:
    """`state` with the parameters and model state saved at `path` (a run's workdir or its
    final_model directory); one line if they do not fit this run's model."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, MODEL_DIRECTORY)):
        path = os.path.join(path, MODEL_DIRECTORY)
    if not os.path.isdir(path):
        raise ConfigError(
            f"init_from={path} is not a directory; give a finished run's workdir or its"
            f" {MODEL_DIRECTORY}/"
        )
    target = {"params": state.params, "model_state": state.model_state}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
        with ocp.StandardCheckpointer() as checkpointer, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = checkpointer.restore(path, abstract)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"init_from={path} does not hold this run's model ({_first_line(error)}); export"
            " it with the same model.* and dataset"
        ) from None
    return state.replace(params=loaded["params"], model_state=loaded["model_state"])
