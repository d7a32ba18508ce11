"""Deterministic batches for one task and their placement on the mesh.

The order of samples is a pure function of (seed, task, epoch). The last batch of an
epoch is padded and masked, so every sample is seen once per epoch and every batch has
the same shape (one compilation).
"""

import math
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from cljax.data.sources import ArraySplit
from cljax.distributed import sharded

Batch = dict[str, np.ndarray]


def epoch_order(indices: np.ndarray, seed: int, task: int, epoch: int) -> np.ndarray:
    """`indices` shuffled by a generator seeded with (seed, task, epoch)."""
    return np.random.default_rng([seed, task, epoch]).permutation(indices)


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    return math.ceil(num_samples / global_batch_size)


def epoch_batches(
    split: ArraySplit,
    indices: np.ndarray,
    global_batch_size: int,
    *,
    seed: int,
    task: int,
    epoch: int,
) -> Iterator[Batch]:
    """Yields host batches {inputs, labels, mask} covering `indices` once, in shuffled order."""
    order = epoch_order(indices, seed, task, epoch)
    for start in range(0, len(order), global_batch_size):
        yield padded_batch(split, order[start : start + global_batch_size], global_batch_size)


def padded_batch(split: ArraySplit, rows: np.ndarray, size: int) -> Batch:
    """Rows of `split`, padded to `size` with masked copies of the first row."""
    mask = np.zeros(size, bool)
    mask[: len(rows)] = True
    padded = np.concatenate([rows, np.full(size - len(rows), rows[0])])
    return {"inputs": split.inputs[padded], "labels": split.labels[padded], "mask": mask}


def to_global(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
    """Places a global host batch on the mesh, each process contributing its own rows."""
    size = len(batch["mask"])
    per_process = size // jax.process_count()
    start = jax.process_index() * per_process
    return {
        key: jax.make_array_from_process_local_data(
            sharded(mesh), value[start : start + per_process], (size, *value.shape[1:])
        )
        for key, value in batch.items()
    }
