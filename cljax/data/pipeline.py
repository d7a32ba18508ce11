"""The input pipeline: every host batch of a run, made by Grain workers, fed by a thread.

A run's batches are planned up front (`plan`): for each task, its training steps (epochs
over its rows, in an order that is a pure function of (seed, task, epoch), the last batch of
an epoch padded and masked so every sample is seen once per epoch and every step has the
same shape), for a strategy that asks for one a pass over the task's rows in their stored
order (evaluation views), then the batches that evaluate it on the whole test split. Each
process reads only its own rows of every global batch: process p of P takes rows [p * G / P,
(p + 1) * G / P), and the mesh splits those further across its devices, so a multi-process
run sees exactly the data of a single-process run with the same global batch. Per-sample
randomness (a training crop) is seeded by (seed, task, epoch, step, position in the global
batch), so it does not depend on the processes either.

Who does what: Grain workers (`dataset.worker_count` of them; none for data held in
memory) turn planned items into batches: read, decode, crop or resize, assemble; every item
is a pure function of the plan, so batches are the same with any number of workers. They are
threads (`dataset.workers=threads`, the default: decoding and resizing release the GIL, and
the Python around them holds it for a few percent of an image's time) or processes (`processes`:
each writes its batches straight into shared memory, which Grain hands over without a copy,
and shares no GIL with the training loop, but pays for fresh shared pages: about 0.1 ms per
224x224 image, measured). The prefetch thread pulls finished batches from Grain and keeps
`dataset.prefetch_depth` of them ready for the training loop, which places each on the mesh
itself (device work from a second thread was seen to deadlock XLA:CPU's collectives).
A run resumed at a `Position` plans only what is left.

`Views` says how a stored example becomes the array a step sees: as stored, resized and
centre-cropped to `dataset.image_size`, or (`inception`) randomly resized-cropped and
flipped; in that mode the pipeline also picks each device's c candidates for the buffer and
sends their un-augmented views. An image that cannot be decoded stops the run naming its
file (`dataset.bad_images=stop`), or is skipped: its row is masked out and counted, never
given a wrong label (`skip`).
"""

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence

import grain
import numpy as np
from absl import flags

try:  # Grain passes arrays in its shared memory from workers without a copy
    from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
except ImportError:  # a Grain without it: batches are copied into shared memory
    SharedMemoryArray = None

from cljax.buffer.candidates import pick_candidate_rows
from cljax.data import transforms
from cljax.data.sources import ArraySplit, Dataset, Split
from cljax.errors import DataError, UndecodableImage

Batch = dict[str, np.ndarray]
LARGE_IMAGE = 64  # `auto` augmentation: crop_flip up to this size, inception above
ITEM_BYTES = 4 << 20  # a plan item of in-memory data holds up to this much
MAX_STEPS_PER_ITEM = 256
BAD_IMAGES = ("stop", "skip")
WORKER_KINDS = ("threads", "processes")
MAX_WORKERS = 16
_NONE_SKIPPED = np.asarray([], dtype=str)


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a run stands in its plan: a small value a checkpoint can hold."""

    task: int = 0
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


def resolve_worker_count(worker_count: int | None, dataset: Dataset, cores: int) -> int:
    """`None`: no workers for data held in memory, else one per core of the process's
    `cores`, leaving one for the training loop (at most 16)."""
    if worker_count is not None:
        return worker_count
    if not dataset.encoded:
        return 0
    return min(MAX_WORKERS, max(1, cores - 1))


@dataclasses.dataclass(frozen=True)
class Views:
    """How a stored example becomes the array a step sees (see the module docstring)."""

    augmentation: str = "none"
    image_size: int | None = None
    channels: int = 3

    @property
    def crops_on_host(self) -> bool:
        return self.augmentation == "inception"

    def _image(self, example) -> np.ndarray:
        return transforms.decode(example, self.channels)

    def stored(self, example) -> np.ndarray:
        """The un-augmented view: as stored, or resized and centre-cropped to image_size."""
        image = self._image(example)
        if self.image_size is None:
            return image
        return transforms.resized_view(image, self.image_size)

    def eval(self, example, out: np.ndarray) -> None:
        """Writes the evaluation view into `out` (the ImageNet standard centre crop where
        inception-style crops train)."""
        image = self._image(example)
        if self.image_size is None:
            np.copyto(out, image)
            return
        fraction = transforms.EVAL_CROP_FRACTION if self.crops_on_host else 1.0
        transforms.resized_view(image, self.image_size, fraction, out)

    def train(self, example, rng: np.random.Generator, out: np.ndarray, store: bool):
        """Writes the training view into `out`; returns the un-augmented view if `store`
        (one decode for both)."""
        image = self._image(example)
        if not self.crops_on_host:
            stored = (
                image
                if self.image_size is None
                else transforms.resized_view(image, self.image_size)
            )
            np.copyto(out, stored)
            return stored if store else None
        transforms.random_resized_crop(image, self.image_size or image.shape[0], rng, out)
        if not store:
            return None
        return image if self.image_size is None else transforms.resized_view(image, self.image_size)


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


@dataclasses.dataclass(frozen=True)
class Item:
    """One planned item: `steps` consecutive training steps of `task` from step `step` of
    epoch `epoch`, (`pass`) the task's rows from `start` of its end-of-task pass, or
    (`eval`) the test rows from `start` evaluated after `task`."""

    kind: str
    task: int
    epoch: int = 0
    step: int = 0
    start: int = 0
    steps: int = 1


def plan(
    task_rows: Sequence[np.ndarray],
    test_size: int,
    epochs: int,
    global_batch_size: int,
    eval_batch_size: int,
    start: Position = Position(),
    steps_per_item: int = 1,
    task_pass: bool = False,
) -> list[Item]:
    """Every batch of the run from `start` on: each task's training steps, up to
    `steps_per_item` to an item (never two tasks'), with `task_pass` the batches of a pass
    over the task's rows, then the batches of its evaluation."""
    items = []
    for task in range(start.task, len(task_rows)):
        count = steps_per_epoch(len(task_rows[task]), global_batch_size)
        first = start.epoch * count + start.step if task == start.task else 0
        for index in range(first, epochs * count, steps_per_item):
            size = min(steps_per_item, epochs * count - index)
            items.append(Item("train", task, *divmod(index, count), steps=size))
        if task_pass:
            rows = len(task_rows[task])
            items.extend(Item("pass", task, start=row) for row in range(0, rows, eval_batch_size))
        items.extend(Item("eval", task, start=row) for row in range(0, test_size, eval_batch_size))
    return items


def steps_per_item(split: Split, views: Views, step_bytes: int) -> int:
    """How many training steps one item of the plan holds: for data held in memory as it is
    stored, as many as fit in `ITEM_BYTES` (a power of two, at most `MAX_STEPS_PER_ITEM`), so
    that a tiny step's batch costs the feed almost nothing; one for data the pipeline decodes
    or crops, whose items the workers make in parallel."""
    if not isinstance(split, ArraySplit) or views.image_size is not None or views.crops_on_host:
        return 1
    fitting = max(1, ITEM_BYTES // max(step_bytes, 1))
    return min(MAX_STEPS_PER_ITEM, 2 ** (fitting.bit_length() - 1))


@dataclasses.dataclass(frozen=True)
class Loader:
    """Makes the batch of a planned `Item` (picklable, for Grain's worker processes).

    `input_shape` is the shape of one view; a skipped image's row holds zeros of it.
    """

    train: Split
    test: Split
    task_rows: tuple[np.ndarray, ...]
    layout: Layout
    views: Views
    input_shape: tuple[int, ...]
    seed: int
    eval_batch_size: int
    bad_images: str = "stop"
    shared_memory: bool = False

    def _allocate(self, rows: int) -> np.ndarray:
        """A batch of views to fill: in shared memory inside a Grain worker, so that it
        reaches the training process with no copy (Grain passes such arrays as they are)."""
        shape = (rows, *self.input_shape)
        if self.shared_memory and SharedMemoryArray is not None:
            return SharedMemoryArray(shape, np.uint8)
        return np.empty(shape, np.uint8)

    def __post_init__(self):
        object.__setattr__(self, "_orders", {})  # (task, epoch) -> order, one epoch kept

    def _order(self, task: int, epoch: int) -> np.ndarray:
        """The epoch's order of the task's rows, computed once per epoch (a permutation of
        a task of ImageNet takes milliseconds: too much to repeat for every batch)."""
        order = self._orders.get((task, epoch))
        if order is None:  # replaced whole, so that worker threads never see it half-changed
            order = epoch_order(self.task_rows[task], self.seed, task, epoch)
            object.__setattr__(self, "_orders", {(task, epoch): order})
        return order

    def __call__(self, item: Item) -> Batch:
        """An evaluation batch, a training step's batch, or (an item of several steps) their
        batches stacked along a leading axis, with one `skipped` list of its images left
        out as undecodable."""
        if item.kind == "eval":
            return self._eval_batch(item.start)
        if item.kind == "pass":
            return self._pass_batch(item.task, item.start)
        if item.steps == 1:
            return self._train_step(item.task, item.epoch, item.step)
        per_epoch = steps_per_epoch(len(self.task_rows[item.task]), self.layout.global_batch_size)
        first = item.epoch * per_epoch + item.step
        batches = [
            self._train_step(item.task, *divmod(index, per_epoch))
            for index in range(first, first + item.steps)
        ]
        stacked = {
            name: np.stack([batch[name] for batch in batches])
            for name in batches[0]
            if name != "skipped"
        }
        return {**stacked, "skipped": np.concatenate([batch["skipped"] for batch in batches])}

    def _train_step(self, task: int, epoch: int, step: int) -> Batch:
        order = self._order(task, epoch)
        size = self.layout.global_batch_size
        chosen = order[step * size : (step + 1) * size]
        local, mask = local_rows(chosen, size, self.layout.process_index, self.layout.process_count)
        return self._train_batch(local, mask, (self.seed, task, epoch, step))

    def _train_batch(self, local: np.ndarray, mask: np.ndarray, seed: tuple) -> Batch:
        """Every row decoded once: its training view (and stored view if picked as a
        candidate; candidates are drawn again, the same way, if a row was skipped)."""
        split, views, layout = self.train, self.views, self.layout
        batch = {"labels": split.labels[local], "mask": mask.copy(), "skipped": _NONE_SKIPPED}
        if isinstance(split, ArraySplit) and views.image_size is None and not views.crops_on_host:
            return {"inputs": split.inputs[local], **batch}
        picked = _pick_candidates(mask, layout, seed) if views.crops_on_host else []
        first = layout.process_index * len(local)
        inputs, stored, skipped = self._allocate(len(local)), {}, []
        for index, row in enumerate(local):
            rng = np.random.default_rng([*seed, first + index])
            try:
                copy = views.train(split.example(int(row)), rng, inputs[index], index in picked)
            except UndecodableImage as error:
                skipped.append(self._skip_or_stop(split, int(row), error))
                batch["mask"][index] = False
                inputs[index] = 0
                copy = inputs[index]
            if copy is not None:
                stored[index] = copy
        batch["inputs"] = inputs
        if picked and skipped:  # draw again among the rows that are still valid
            picked = _pick_candidates(batch["mask"], layout, seed)
            for index in set(picked) - set(stored):
                stored[index] = views.stored(split.example(int(local[index])))
        if picked:
            batch["candidate_rows"] = (np.asarray(picked) % layout.per_device).astype(np.int32)
            batch["candidate_inputs"] = np.stack([stored[index] for index in picked])
        return {**batch, "skipped": np.asarray(skipped, dtype=str)}

    def _eval_batch(self, start: int) -> Batch:
        """This process's rows of the test batch from `start` (see `_view_batch`)."""
        rows = np.arange(start, min(start + self.eval_batch_size, len(self.test)))
        return self._view_batch(self.test, *self._local_rows(rows))

    def _pass_batch(self, task: int, start: int) -> Batch:
        """This process's rows of the task's end-of-task pass batch from `start`, with their
        labels (see `_view_batch`)."""
        local, valid = self._local_rows(self.task_rows[task][start : start + self.eval_batch_size])
        return {**self._view_batch(self.train, local, valid), "labels": self.train.labels[local]}

    def _local_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This process's part of a batch of `eval_batch_size` rows made of `rows`, and which
        of them are real rather than padding."""
        layout = self.layout
        return local_rows(rows, self.eval_batch_size, layout.process_index, layout.process_count)

    def _view_batch(self, split: Split, local: np.ndarray, valid: np.ndarray) -> Batch:
        """The evaluation views of `split`'s rows `local`, and which rows hold a sample
        (`valid`, less any image skipped as undecodable)."""
        if isinstance(split, ArraySplit) and self.views.image_size is None:
            return {"inputs": split.inputs[local], "valid": valid, "skipped": _NONE_SKIPPED}
        inputs, skipped = self._allocate(len(local)), []
        for index, row in enumerate(local):
            try:
                self.views.eval(split.example(int(row)), inputs[index])
            except UndecodableImage as error:
                skipped.append(self._skip_or_stop(split, int(row), error))
                valid[index] = False
                inputs[index] = 0
        return {"inputs": inputs, "valid": valid, "skipped": np.asarray(skipped, str)}

    def _skip_or_stop(self, split: Split, row: int, error: Exception) -> str:
        """The sample's name under `bad_images=skip`; a `DataError` naming it under `stop`."""
        if self.bad_images == "skip":
            return split.describe(row)
        raise DataError(
            f"{split.describe(row)} cannot be decoded ({error}); fix or remove it, or set"
            " --config.dataset.bad_images=skip to leave such images out"
        )


def _pick_candidates(mask: np.ndarray, layout: Layout, seed: tuple) -> list[int]:
    """Each of this process's devices' candidates (see `pick_candidate_rows`)."""
    first_device = layout.process_index * layout.local_devices
    return pick_candidate_rows(
        mask,
        layout.per_device,
        first_device,
        layout.num_candidates,
        (*seed, layout.global_batch_size),
    )


def batches(
    loader: Loader, items: list[Item], worker_count: int, kind: str = "threads"
) -> Iterator[Batch]:
    """The batches of `items`, in order, made by `worker_count` Grain workers of `kind`
    (`threads` or `processes`), or by the calling thread with none."""
    read_inline = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    if worker_count == 0:
        return iter(grain.MapDataset.source(items).map(loader).to_iter_dataset(read_inline))
    if kind == "threads":
        dataset = grain.MapDataset.source(items).map(loader).to_iter_dataset(read_inline)
        prefetched = grain.experimental.multithread_prefetch(
            dataset, num_threads=worker_count, buffer_size=2 * worker_count
        )
        return iter(prefetched)
    if not flags.FLAGS.is_parsed():  # Grain reads absl flags; a notebook never parses them
        flags.FLAGS.mark_as_parsed()
    _quiet_resource_tracker()
    worker_loader = dataclasses.replace(loader, shared_memory=True)
    dataset = grain.MapDataset.source(items).map(worker_loader).to_iter_dataset(read_inline)
    options = grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=2)
    return iter(dataset.mp_prefetch(options))


def _quiet_resource_tracker() -> None:
    """Grain's workers create the shared memory that carries batches and this process
    unlinks it; Python's resource tracker, which saw only the creation, would warn at exit of
    segments 'leaked' (none is left in /dev/shm). The tracker is a child process started
    with this environment."""
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    current = os.environ.get("PYTHONWARNINGS", "")
    if quiet not in current:
        os.environ["PYTHONWARNINGS"] = f"{current},{quiet}" if current else quiet


def read_inputs(split: Split, rows: np.ndarray, views: Views, shape: tuple) -> np.ndarray:
    """The evaluation views (of `shape`) of `rows`, read in this thread."""
    if isinstance(split, ArraySplit) and views.image_size is None:
        return split.inputs[rows]
    inputs = np.empty((len(rows), *shape), np.uint8)
    for index, row in enumerate(rows):
        views.eval(split.example(int(row)), inputs[index])
    return inputs
