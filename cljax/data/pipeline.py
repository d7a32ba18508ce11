"""Deterministic batches for one task, and a prefetch thread that prepares them ahead.

The order of samples is a pure function of (seed, task, epoch). The last batch of an
epoch is padded and masked, so every sample is seen once per epoch and every batch has the
same shape (one compilation). Each process reads only its own rows of the global batch:
process p of P takes rows [p * G / P, (p + 1) * G / P), and the mesh splits those further
across its devices, so a multi-process run sees exactly the data of a single-process run
with the same global batch. Augmentation (random crop with 4 pixels of padding and
horizontal flip, for natural images of the training split) is seeded by
(seed, task, epoch, step).
"""

import dataclasses
import math
import queue
import threading
import time
from collections.abc import Iterator

import numpy as np

from cljax.data.sources import Split

Batch = dict[str, np.ndarray]
CROP_PADDING = 4


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the sampler is within a task: a small value a checkpoint can hold."""

    epoch: int = 0
    step: int = 0


def epoch_order(rows: np.ndarray, seed: int, task: int, epoch: int) -> np.ndarray:
    """`rows` shuffled by a generator seeded with (seed, task, epoch)."""
    return np.random.default_rng([seed, task, epoch]).permutation(rows)


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    return math.ceil(num_samples / global_batch_size)


def process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of a global batch that one process reads."""
    per_process = global_batch_size // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def local_rows(
    chosen: np.ndarray, global_batch_size: int, process_index: int, process_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of a global batch made of `chosen` (cycled to fill the batch),
    and which of them are real rather than padding."""
    mine = process_slice(global_batch_size, process_index, process_count)
    valid = np.arange(global_batch_size) < len(chosen)
    return np.resize(chosen, global_batch_size)[mine], valid[mine]


def task_batches(
    split: Split,
    rows: np.ndarray,
    global_batch_size: int,
    *,
    seed: int,
    task: int,
    epochs: int,
    augment: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    start: Position = Position(),
) -> Iterator[Batch]:
    """This process's part {inputs, labels, mask} of every global batch of a task, from
    `start` (epoch and step within it) on: a resumed run sees the batches it had not seen."""
    for epoch in range(start.epoch, epochs):
        order = epoch_order(rows, seed, task, epoch)
        first_step = start.step if epoch == start.epoch else 0
        for step in range(first_step, steps_per_epoch(len(order), global_batch_size)):
            start_row = step * global_batch_size
            chosen = order[start_row : start_row + global_batch_size]
            padded, mask = local_rows(chosen, global_batch_size, process_index, process_count)
            inputs = split.read(padded)
            if augment:
                rng = np.random.default_rng([seed, task, epoch, step, process_index])
                inputs = crop_and_flip(inputs, rng)
            yield {"inputs": inputs, "labels": split.labels[padded], "mask": mask}


def crop_and_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crop after zero-padding by `CROP_PADDING`, and random horizontal flip (NHWC)."""
    num, height, width = images.shape[:3]
    pad = CROP_PADDING
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    tops = rng.integers(0, 2 * pad + 1, num)
    lefts = rng.integers(0, 2 * pad + 1, num)
    flips = rng.random(num) < 0.5
    out = np.empty_like(images)
    for i in range(num):
        crop = padded[i, tops[i] : tops[i] + height, lefts[i] : lefts[i] + width]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out


class _End:
    """Marks the end of the producer's iterator."""


@dataclasses.dataclass
class _Failure:
    error: BaseException


class Prefetcher:
    """Runs an iterator (reading, decoding, augmenting) in a background thread, `depth`
    items ahead of the consumer.

    The consumer places the items on devices itself: device work from a second thread can
    deadlock XLA:CPU's in-process collectives. An exception in the thread is raised in the
    consumer at the item where it happened. `wait_s` is the time the consumer spent
    waiting for items. Use as a context manager so the thread stops.
    """

    def __init__(self, items: Iterator, depth: int = 2):
        self.wait_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,), daemon=True)
        self._thread.start()

    def _produce(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(_End())
        except BaseException as error:
            self._put(_Failure(error))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - start
        if isinstance(item, _End):
            raise StopIteration
        if isinstance(item, _Failure):
            raise RuntimeError(f"data pipeline failed: {item.error!r}") from item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
