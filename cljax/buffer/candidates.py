"""What a training step offers its buffer: c candidates of each device's batch.

On the device (`step_candidates`) the buffer's `insert` draws the c candidates among all the
rows it is given. Where the input pipeline augments new samples on the host (random resized
crops), the buffer must store the un-augmented view instead, which only the host has: the
pipeline then draws each device's c candidates itself (`pick_candidate_rows`) and sends their
un-augmented views with the batch (`candidate_rows`, `candidate_inputs`).
"""

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from cljax.buffer.state import LABELS, MASK, TASK_ID


def step_candidates(
    batch: Mapping[str, jax.Array], task_id: jax.Array, stored: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
    """What a step offers the buffer: the batch rows with the values the strategy stores for
    them (`stored`), or only the rows the input pipeline picked, with their un-augmented
    views."""
    if "candidate_rows" not in batch:
        return {
            "inputs": batch["inputs"],
            LABELS: batch[LABELS],
            MASK: batch[MASK],
            TASK_ID: task_id,
            **stored,
        }
    rows = batch["candidate_rows"]
    picked = {
        name: value[rows]
        for name, value in {LABELS: batch[LABELS], MASK: batch[MASK], **stored}.items()
    }
    return {"inputs": batch["candidate_inputs"], TASK_ID: task_id, **picked}


def pick_candidate_rows(
    mask: np.ndarray, per_device: int, first_device: int, num_candidates: int, seed: Sequence[int]
) -> list[int]:
    """For each device whose rows `mask` holds (`per_device` rows each, the first being
    global device `first_device`), `num_candidates` of its rows drawn uniformly from the
    valid ones (all of its rows if fewer are valid), seeded by `seed` and the device's global
    index: positions in `mask`, device by device."""
    picked = []
    for device in range(len(mask) // per_device):
        rows = np.arange(device * per_device, (device + 1) * per_device)
        rng = np.random.default_rng([*seed, first_device + device])
        scores = rng.random(len(rows)) + 2.0 * ~mask[rows]
        picked.extend(rows[np.argsort(scores)[:num_candidates]].tolist())
    return picked
