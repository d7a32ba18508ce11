"""The watchdog: a process that stops making progress says why and exits, instead of hanging.

In a multi-process run, a process that died or cannot be reached leaves the others blocked in
a collective. Each process's `Watchdog` turns that hang into an exit with status 3 and one
line that names the process that went silent. Processes post that they are alive in
jax.distributed's key-value store (`KeyValueLiveness`); the runtime gives each watchdog its
posts.
"""

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable

from cljax.errors import EXIT_LOST_PROCESS

ALIVE_PREFIX = "cljax/alive/"


class KeyValueLiveness:
    """Each process posts the time every second in the coordination service's key-value
    store and notes, by its own clock, when each process's post last changed: a process
    whose post stopped changing has gone silent. Its own clock, so that the clocks of
    different nodes need not agree and a post left by an earlier run in the same job counts
    only from when this watchdog first saw it."""

    STALE_S = 5.0

    def __init__(self, client, process_index: int, process_count: int):
        self.client = client
        self.process_index = process_index
        self.reachable = True
        started = time.monotonic()
        self._seen: dict[int, tuple[str | None, float]] = {
            index: (None, started) for index in range(process_count)
        }

    def report_alive(self) -> None:
        key = f"{ALIVE_PREFIX}{self.process_index}"
        self.client.key_value_set(key, repr(time.time()), allow_overwrite=True)

    def observe(self) -> None:
        """Reads every process's post; the store is unreachable when process 0, which hosts
        it, is gone."""
        try:
            posts = dict(self.client.key_value_dir_get(ALIVE_PREFIX))
        except Exception:  # any failure here means the coordinator is unreachable
            self.reachable = False
            return
        self.reachable = True
        now = time.monotonic()
        for index, (seen, _) in self._seen.items():
            post = posts.get(f"{ALIVE_PREFIX}{index}")
            if post != seen:
                self._seen[index] = (post, now)

    def silent_processes(self, longer_than_s: float) -> list[int]:
        """Other processes whose post has not changed for `longer_than_s`."""
        now = time.monotonic()
        return [
            index
            for index, (_, since) in self._seen.items()
            if index != self.process_index and now - since > longer_than_s
        ]


class Watchdog:
    """Stops the process with one clear line when no progress is reported for `timeout_s`.

    In a multi-process run, a process that died or cannot be reached leaves the others
    blocked in a collective; the watchdog turns that hang into an exit with status 3 and
    says which process went silent. The stall check arms at the first reported progress, so
    that compiling the first step (which can take long for a large model) never counts;
    until then the watchdog stops only when another process has gone silent for
    `timeout_s`. Once armed, a stall of `timeout_s` stops the process when another process
    has gone silent (or, without liveness posts, when it cannot tell): a slow phase of a
    live process (process 0 writing plots alone, a loaded machine) is no loss. A stall of
    `STUCK_FACTOR` x `timeout_s` stops it regardless. An inactive watchdog (a single
    process) does nothing.
    """

    EXIT_STATUS = EXIT_LOST_PROCESS
    ADVICE = "check its log (distributed.log_dir) and start the job again; stopping"
    #: A stall this many times `timeout_s` stops the process even while every other
    #: process is alive: the job is stuck (a hang inside one of them).
    STUCK_FACTOR = 3
    #: How long an error in the training loop waits for the liveness posts to tell whether
    #: another process died: twice the time a death takes to show.
    LOSS_WAIT_S = 2 * KeyValueLiveness.STALE_S

    def __init__(
        self, timeout_s: float, process_index: int = 0, what: str = "training", active=True
    ):
        self.timeout_s = timeout_s
        self.process_index = process_index
        self.what = what
        self.active = active
        self.liveness: KeyValueLiveness | None = None
        #: Called with the stop's line just before the process exits (the trainer records
        #: it in metrics.json); from the watchdog's thread, while the training loop hangs.
        self.on_stop: Callable[[str], None] | None = None
        self._last: float | None = None
        self._stopping = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def progress(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            if self.liveness is not None:
                with contextlib.suppress(Exception):  # observe() notices an unreachable store
                    self.liveness.report_alive()
                self.liveness.observe()
            if self._last is None:
                self._stop_if_another_went_silent()
                continue
            idle = time.monotonic() - self._last
            loss = self._suspected_loss() if idle > self.timeout_s else None
            if loss is not None:
                self._stop_process(self._stall_message(idle, loss))
            if idle > self.STUCK_FACTOR * self.timeout_s:
                self._stop_process(self._stuck_message(idle))

    def stop_if_a_process_was_lost(self, error: BaseException) -> None:
        """Called with the error that ended the loop: when another process went silent or
        process 0 is out of reach, the error is that loss seen from here (a collective whose
        peer died fails at once instead of hanging), so the process stops as a stall would,
        naming the lost process. Returns when the liveness posts show every process alive
        for `LOSS_WAIT_S` (a death shows within `KeyValueLiveness.STALE_S`): the error is
        this process's own."""
        liveness = self.liveness
        if not self.active or liveness is None:
            return
        deadline = time.monotonic() + self.LOSS_WAIT_S
        while time.monotonic() < deadline:
            liveness.observe()
            loss = self._suspected_loss()
            if loss is not None:
                cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
                self._stop_process(
                    f"cljax: process {self.process_index} stopped {self.what}: {loss}"
                    f" ({cause[:200]}); {self.ADVICE}"
                )
            time.sleep(0.25)

    def _suspected_loss(self) -> str | None:
        """The lost process a stall may come from, in words: one whose liveness post has
        stopped changing, or the coordinator out of reach; with no posts to tell by, some
        process. None when every process is alive."""
        liveness = self.liveness
        if liveness is None:
            return "another process probably died or cannot be reached"
        if not liveness.reachable:
            return "lost contact with process 0 (the coordinator)"
        silent = liveness.silent_processes(liveness.STALE_S)
        return f"lost process {', '.join(map(str, silent))}" if silent else None

    def _stop_if_another_went_silent(self) -> None:
        if self.liveness is None or not self.liveness.reachable:
            return
        silent = self.liveness.silent_processes(self.timeout_s)
        if silent:
            self._stop_process(
                f"cljax: process {self.process_index} lost process"
                f" {', '.join(map(str, silent))} before its first {self.what} progress: silent"
                f" for more than distributed.timeout_s={self.timeout_s} s; {self.ADVICE}"
            )

    def _stall_message(self, idle: float, lost: str) -> str:
        return (
            f"cljax: process {self.process_index} made no {self.what} progress for {idle:.0f} s"
            f" (distributed.timeout_s={self.timeout_s}): {lost}; {self.ADVICE}"
        )

    def _stuck_message(self, idle: float) -> str:
        return (
            f"cljax: process {self.process_index} made no {self.what} progress for {idle:.0f} s"
            f" ({self.STUCK_FACTOR} x distributed.timeout_s={self.timeout_s}) while every"
            f" process is alive: the job is stuck; {self.ADVICE}"
        )

    def _stop_process(self, message: str) -> None:
        """Says why and exits with EXIT_STATUS, skipping Python's shutdown (whose
        jax.distributed barrier would abort with a crash dump); the first caller of the
        watchdog's thread and the training loop's wins."""
        self._stopping.acquire()
        print(message, file=sys.stderr, flush=True)
        if self.on_stop is not None:
            with contextlib.suppress(Exception):  # nothing may keep the process from stopping
                self.on_stop(message)
        os._exit(Watchdog.EXIT_STATUS)

    def __enter__(self) -> "Watchdog":
        if self.active:
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
