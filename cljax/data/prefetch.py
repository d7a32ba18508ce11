"""The prefetch thread: the input pipeline's batches made ahead of the training loop, and
the reader that takes training steps from them any number at a time.

The training loop places each batch on the devices itself: device work issued from a second
thread can deadlock XLA:CPU's in-process collectives. An exception in the thread reaches the
loop at the batch where it happened.
"""

import dataclasses
import queue
import threading
import time
from collections.abc import Iterator

import numpy as np

from cljax.errors import DataError


class _End:
    """Marks the end of the producer's iterator."""


@dataclasses.dataclass
class _Failure:
    error: BaseException


class Prefetcher:
    """Runs an iterator (Grain's, reading, decoding, augmenting) in a background thread,
    `depth` items ahead of the consumer.

    The consumer places the items on devices itself: device work from a second thread can
    deadlock XLA:CPU's in-process collectives. An exception in the thread is raised in the
    consumer at the item where it happened (a `DataError` as it is, one line). `wait_s` is
    the time the consumer spent waiting for items. Use as a context manager so the thread
    stops.
    """

    def __init__(self, items: Iterator, depth: int = 2):
        self.wait_s = 0.0
        self._items = items
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
            if isinstance(item.error, DataError):
                raise DataError(str(item.error)) from None
            raise RuntimeError(f"data pipeline failed: {item.error!r}") from item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        close = getattr(self._items, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class TrainSteps:
    """Takes training steps from a feed whose training items hold one step's batch or
    several steps' batches stacked along a leading axis (`pipeline.plan`'s items), any
    number of steps at a time. A task's items hold its steps only, so a task read to its
    end leaves nothing held."""

    def __init__(self, feed: Iterator):
        self.feed = feed
        self._held: dict[str, np.ndarray] | None = None
        self._offset = 0

    @property
    def holding(self) -> bool:
        """Whether steps of the item read last are still to be taken."""
        return self._held is not None

    def take(self, count: int) -> tuple[dict[str, np.ndarray], list[str]]:
        """The next `count` steps' batches, stacked along a leading axis, and the images
        left out as undecodable in the items read to make them."""
        pieces, skipped = [], []
        while count:
            if self._held is None:
                item = next(self.feed)
                skipped.extend(item.pop("skipped").tolist())
                one_step = item["mask"].ndim == 1
                self._held = (
                    {name: value[None] for name, value in item.items()} if one_step else item
                )
                self._offset = 0
            size = len(self._held["mask"])
            taken = min(count, size - self._offset)
            end = self._offset + taken
            pieces.append({name: value[self._offset : end] for name, value in self._held.items()})
            self._offset, count = end, count - taken
            if end == size:
                self._held = None
        if len(pieces) == 1:
            return pieces[0], skipped
        return {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}, skipped
