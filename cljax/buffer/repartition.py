"""Re-partitioning a global buffer for a run resumed on another number of devices."""

import numpy as np

from cljax.buffer.state import BufferState


def repartition(
    buffer: BufferState,
    old_devices: int,
    new_devices: int,
    num_classes: int,
    new_budget: int,
    seed: int,
) -> BufferState:
    """The global buffer of `old_devices` devices dealt out to `new_devices` devices of
    `new_budget` slots per partition (`num_classes` partitions: the classes, or 1 for a
    buffer partitioned by stream, whose stored labels move with their samples).

    Per partition, the stored samples of all old devices are pooled; if the new global capacity
    (new_devices x new_budget) holds them all they are all kept, else a uniform subset of
    that size (drawn with `seed`). They are dealt round-robin over the new devices, so fills
    differ by at most one. Each device's `seen` counter becomes the class's total seen
    divided evenly (at least its fill), so reservoir sampling goes on at the right rate;
    slots left free (a class seen more often than the new devices store) fill first.
    """
    rng = np.random.default_rng(seed)
    old_budget = buffer.task_ids.shape[1]

    def per_device(array: np.ndarray) -> np.ndarray:
        return array.reshape(old_devices, num_classes, *array.shape[1:])

    data = {name: per_device(value) for name, value in buffer.data.items()}
    labels, task_ids, counts, seen = (
        per_device(x) for x in (buffer.labels, buffer.task_ids, buffer.counts, buffer.seen)
    )
    new_data = {
        name: np.zeros((new_devices, num_classes, new_budget, *value.shape[3:]), value.dtype)
        for name, value in data.items()
    }
    new_task_ids = np.full((new_devices, num_classes, new_budget), -1, np.int32)
    new_labels = np.broadcast_to(
        np.arange(num_classes, dtype=np.int32)[None, :, None], new_task_ids.shape
    ).copy()
    new_counts = np.zeros((new_devices, num_classes), np.int32)
    new_seen = np.zeros((new_devices, num_classes), np.int32)
    for label in range(num_classes):
        stored = [
            (device, slot)
            for device in range(old_devices)
            for slot in range(min(int(counts[device, label]), old_budget))
        ]
        kept = min(len(stored), new_devices * new_budget)
        chosen = (
            sorted(rng.choice(len(stored), kept, replace=False))
            if kept < len(stored)
            else range(kept)
        )
        for order, index in enumerate(chosen):
            device, slot = stored[index]
            target, target_slot = order % new_devices, order // new_devices
            for name in data:
                new_data[name][target, label, target_slot] = data[name][device, label, slot]
            new_task_ids[target, label, target_slot] = task_ids[device, label, slot]
            new_labels[target, label, target_slot] = labels[device, label, slot]
            new_counts[target, label] += 1
        total_seen = int(seen[:, label].sum())
        for device in range(new_devices):
            share = total_seen // new_devices + (device < total_seen % new_devices)
            new_seen[device, label] = max(share, new_counts[device, label])

    def global_rows(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array.reshape(new_devices * num_classes, *array.shape[2:]))

    return BufferState(
        data={name: global_rows(value) for name, value in new_data.items()},
        labels=global_rows(new_labels),
        task_ids=global_rows(new_task_ids),
        counts=global_rows(new_counts),
        seen=global_rows(new_seen),
    )
