"""The distributed rehearsal buffer, a library of pure functions in the style of optax.

    from cljax.buffer import rehearsal_buffer

    buffer = rehearsal_buffer(num_classes=10, budget_per_class=20, num_candidates=2,
                              num_representatives=4)
    state = buffer.init({"inputs": jnp.zeros((28, 28, 1), jnp.uint8)})
    state = buffer.insert(state, {"inputs": x, "labels": y}, key)
    representatives = buffer.sample(state, key, shared_key)

- `core`: `rehearsal_buffer` and the per-device functions (`init`, `insert`, `sample`);
- `state`: the state types (`BufferState`, `Representatives`, `RehearsalState`);
- `mesh`: `on_mesh(buffer, mesh)`, the same functions over the devices of a mesh;
- `candidates`: what a training step offers the buffer;
- `repartition`: a global buffer dealt out to another number of devices.

It imports JAX, NumPy and the collectives interface only.
"""

from cljax.buffer.core import RehearsalBuffer, record_bytes, rehearsal_buffer
from cljax.buffer.mesh import ShardedBuffer, on_mesh
from cljax.buffer.repartition import repartition
from cljax.buffer.state import (
    DRAWS,
    LABELS,
    MASK,
    MEMORY_KINDS,
    PARTITIONS,
    POLICIES,
    STREAM_POLICIES,
    TASK_ID,
    BufferState,
    Example,
    RehearsalState,
    Representatives,
)

__all__ = [
    "DRAWS",
    "LABELS",
    "MASK",
    "MEMORY_KINDS",
    "PARTITIONS",
    "POLICIES",
    "STREAM_POLICIES",
    "TASK_ID",
    "BufferState",
    "Example",
    "RehearsalBuffer",
    "RehearsalState",
    "Representatives",
    "ShardedBuffer",
    "on_mesh",
    "record_bytes",
    "rehearsal_buffer",
    "repartition",
]
