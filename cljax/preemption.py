"""SIGTERM and SIGUSR1 (what Slurm sends before a time limit with `--signal`) ask a run to
save a checkpoint and stop; the training loop asks `requested` between steps.

In a job of several processes the signal may reach them at different steps, so they agree:
at the first check at or past every multiple of `AGREE_EVERY_STEPS` steps (every block of
steps dispatched together ends at a check; every process has the same blocks) and at every
task's end, each says whether it was signalled and all stop if any was, at the same step.
"""

import signal
import threading

import numpy as np

from cljax.runtime import Runtime

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
AGREE_EVERY_STEPS = 10


class Preemption:
    """A context that catches `SIGNALS` (main thread only; elsewhere it does nothing)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.received: int | None = None
        self._previous: dict = {}
        self._period: int | None = None

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._receive) for sig in SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _receive(self, signum: int, frame) -> None:
        self.received = signum

    def requested(self, step: int | None = None) -> bool:
        """Whether the run should stop now, at training `step` of the run (None: a point
        every process reaches, such as a task's end); the same answer on every process."""
        if self.runtime.process_count == 1:
            return self.received is not None
        if step is not None:
            period = step // AGREE_EVERY_STEPS
            previous, self._period = self._period, period
            if previous is None or period == previous:
                return False
        signalled = np.asarray([float(self.received is not None)])
        return bool(self.runtime.max_over_processes(signalled)[0])

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal"
