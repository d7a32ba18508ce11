"""Deterministic batches for one task, and a prefetch thread that prepares them ahead.

The order of samples is a pure function of (seed, task, epoch). The last batch of an
epoch is padded and masked, so every sample is seen once per epoch and every batch has the
same shape (one compilation). Each process reads only its own rows of the global batch:
process p of P takes rows [p * G / P, (p + 1) * G / P), and the mesh splits those further
across its devices, so a multi-process run sees exactly the data of a single-process run
with the same global batch. Per-sample randomness (a training crop) is seeded by (seed,
task, epoch, step, position in the global batch), so it does not depend on the processes
either.

`Views` says how a stored example becomes the array a step sees: as stored, resized and
centre-cropped to `dataset.image_size`, or (`inception` augmentation) randomly
resized-cropped and flipped; in that mode the pipeline also picks each device's c candidates
for the buffer and sends their un-augmented views.
"""

import dataclasses
import math
import queue
import threading
import time
from collections.abc import Iterator

import numpy as np

from cljax.data import transforms
from cljax.data.sources import ArraySplit, Dataset, Split

Batch = dict[str, np.ndarray]
LARGE_IMAGE = 64  # `auto` augmentation: crop_flip up to this size, inception above


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the sampler is within a task: a small value a checkpoint can hold."""

    epoch: int = 0
    step: int = 0


def resolve_augmentation(mode: str, dataset: Dataset) -> str:
    """`auto`: none for inputs that are not natural (RGB) images, crop_flip up to 64 pixels,
    inception above; any other mode as given."""
    if mode != "auto":
        return mode
    if not dataset.natural_images:
        return "none"
    return "crop_flip" if dataset.input_shape[0] <= LARGE_IMAGE else "inception"


@dataclasses.dataclass(frozen=True)
class Views:
    """How a stored example becomes the array a step sees (see the module docstring)."""

    augmentation: str = "none"
    image_size: int | None = None

    @property
    def crops_on_host(self) -> bool:
        return self.augmentation == "inception"

    def _image(self, example) -> np.ndarray:
        return transforms.decode(example)

    def stored(self, example) -> np.ndarray:
        """The un-augmented view: as stored, or resized and centre-cropped to image_size."""
        image = self._image(example)
        return image if self.image_size is None else transforms.resized_view(image, self.image_size)

    def eval(self, example) -> np.ndarray:
        """The evaluation view (the ImageNet standard centre crop where inception-style
        crops train)."""
        image = self._image(example)
        if self.image_size is None:
            return image
        fraction = transforms.EVAL_CROP_FRACTION if self.crops_on_host else 1.0
        return transforms.resized_view(image, self.image_size, fraction)

    def train(self, example, rng: np.random.Generator, store: bool) -> tuple:
        """The training view, and the un-augmented view too if `store` (one decode)."""
        image = self._image(example)
        stored = (
            image if self.image_size is None else transforms.resized_view(image, self.image_size)
        )
        if not self.crops_on_host:
            return stored, stored if store else None
        size = self.image_size or image.shape[0]
        return transforms.random_resized_crop(image, size, rng), stored if store else None


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


def read_inputs(split: Split, rows: np.ndarray, views: Views) -> np.ndarray:
    """The evaluation views of `rows` (arrays of an in-memory split, read at once)."""
    if isinstance(split, ArraySplit) and views.image_size is None:
        return split.inputs[rows]
    return np.stack([views.eval(split.example(int(row))) for row in rows])


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a global batch is split: over processes, then over each process's devices, and
    how many candidates each device offers its buffer (used when the pipeline picks them)."""

    global_batch_size: int
    process_index: int = 0
    process_count: int = 1
    local_devices: int = 1
    num_candidates: int = 0

    @property
    def per_device(self) -> int:
        return self.global_batch_size // (self.process_count * self.local_devices)


def task_batches(
    split: Split,
    rows: np.ndarray,
    layout: Layout,
    views: Views,
    *,
    seed: int,
    task: int,
    epochs: int,
    start: Position = Position(),
) -> Iterator[Batch]:
    """This process's part {inputs, labels, mask[, candidate_rows, candidate_inputs]} of
    every global batch of a task, from `start` (epoch and step within it) on: a resumed run
    sees the batches it had not seen."""
    size = layout.global_batch_size
    for epoch in range(start.epoch, epochs):
        order = epoch_order(rows, seed, task, epoch)
        first_step = start.step if epoch == start.epoch else 0
        for step in range(first_step, steps_per_epoch(len(order), size)):
            chosen = order[step * size : (step + 1) * size]
            local, mask = local_rows(chosen, size, layout.process_index, layout.process_count)
            yield _load(split, local, mask, layout, views, (seed, task, epoch, step))


def _load(split: Split, local: np.ndarray, mask: np.ndarray, layout: Layout, views: Views, seed):
    """One batch: every row decoded once, its training view (and stored view if picked)."""
    batch = {"labels": split.labels[local], "mask": mask}
    if isinstance(split, ArraySplit) and views.image_size is None and not views.crops_on_host:
        return {"inputs": split.inputs[local], **batch}
    picked = _pick_candidates(mask, layout, seed) if views.crops_on_host else []
    first = layout.process_index * len(local)
    inputs, stored = [], {}
    for index, row in enumerate(local):
        rng = np.random.default_rng([*seed, first + index])
        view, copy = views.train(split.example(int(row)), rng, store=index in picked)
        inputs.append(view)
        if copy is not None:
            stored[index] = copy
    batch["inputs"] = np.stack(inputs)
    if picked:
        batch["candidate_rows"] = (np.asarray(picked) % layout.per_device).astype(np.int32)
        batch["candidate_inputs"] = np.stack([stored[index] for index in picked])
    return batch


def _pick_candidates(mask: np.ndarray, layout: Layout, seed) -> list[int]:
    """For each of this process's devices, `num_candidates` of its rows drawn uniformly
    from the valid ones (all of its rows if fewer are valid), seeded by the device's global
    index: positions within this process's rows, device by device."""
    picked = []
    for device in range(layout.local_devices):
        rows = np.arange(device * layout.per_device, (device + 1) * layout.per_device)
        global_device = layout.process_index * layout.local_devices + device
        rng = np.random.default_rng([*seed, layout.global_batch_size, global_device])
        scores = rng.random(len(rows)) + 2.0 * ~mask[rows]
        picked.extend(rows[np.argsort(scores)[: layout.num_candidates]].tolist())
    return picked


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
