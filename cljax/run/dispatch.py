"""Training steps on the devices: one step per dispatch, or a block of up to K in one.

Where a step's own work is small (a tiny model at batch 10), the host's part of every step,
Python and the dispatch, sets the speed. A block of K steps is one call of a program that
scans the train step over K batches placed on the devices together (`steps.make_train_steps`):
the same keys, the same values bit for bit, the host's share paid once per block.

K is `steps_per_dispatch`, or, left unset, chosen from the time of the run's first steps:
the first `CALIBRATION_STEPS` run one per dispatch, and K is the power of two that makes a
block last about `BLOCK_S` (1 where a step takes that long already), at most `MAX_STEPS`;
every process uses process 0's choice.
"""

import dataclasses
import math
import time

import jax
import numpy as np

from cljax import steps
from cljax.run.build import Machinery
from cljax.run.console import Console
from cljax.runtime import Runtime

CALIBRATION_STEPS = 10  # the first compiles, the next timed
BLOCK_S = 0.05
MAX_STEPS = 256


@dataclasses.dataclass(frozen=True)
class Block:
    """Steps dispatched together: the task's index of the first, how many, and, one value
    per step, their metrics (on the devices until read) and learning rates."""

    first: int
    count: int
    metrics: dict
    learning_rates: np.ndarray

    def read(self) -> dict[str, np.ndarray]:
        """The metrics on the host, `count` values each."""
        return {
            name: np.atleast_1d(np.asarray(value))[: self.count]
            for name, value in jax.device_get(self.metrics).items()
        }


class Dispatcher:
    """Runs a task's steps on the devices, one per call or a block of up to K (see the
    module docstring)."""

    def __init__(
        self, machinery: Machinery, runtime: Runtime, console: Console, length: int | None
    ):
        self.machinery = machinery
        self.runtime = runtime
        self.console = console
        self.length = length
        self._blocks = None
        self._single_calls: list[float] = []
        self._placed: dict[str, tuple] = {}
        self.last_args: tuple = ()

    def block_length(self, left: int, next_boundary: int) -> int:
        """How many steps the next call runs: 1 while K is being chosen, else up to K, never
        past `left` steps or a boundary `next_boundary` steps ahead."""
        if self.length is None:
            return 1
        return max(1, min(self.length, left, next_boundary))

    def run(
        self, state, rehearsal, host_batch: dict, task: int, rates: np.ndarray, single: bool = False
    ):
        """The train steps of `task` whose batches `host_batch` stacks along its leading axis,
        at learning rates `rates`; returns the states and their metrics (not yet read). Once
        K > 1 is known every call, a single step too, runs the block program (a run with
        `steps_per_dispatch` set above 1 never traces the one-step program), except a
        `single` one: a profiled step, whose trace and HLO are to be the step's own."""
        if self.length in (None, 1) or single:
            if self.length is None:  # choosing K: one step per call, timed
                self._calibrate()
            args = (
                self.runtime.place({name: value[0] for name, value in host_batch.items()}),
                self._replicated("task", np.int32(task)),
                self._replicated("rate", np.float32(rates[0])),
            )
            state, rehearsal, metrics = self.machinery.train_step(state, rehearsal, *args)
        else:
            args = self._block_args(host_batch, task, rates)
            state, rehearsal, metrics = self._block_program()(state, rehearsal, *args)
        self.last_args = args
        return state, rehearsal, metrics

    def program_text(self, state, rehearsal) -> str:
        """The HLO text of the program the last call ran (for a profile's summary)."""
        program = self.machinery.train_step if len(self.last_args) == 3 else self._blocks
        return program.lower(state, rehearsal, *self.last_args).compile().as_text()

    def _block_args(self, host_batch: dict, task: int, rates: np.ndarray) -> tuple:
        """A block's arguments: `length` steps' batches (the last repeated past `count`,
        those steps being skipped), the task id, the rates and the count."""
        count, length = len(rates), self.length
        if count < length:
            host_batch = {
                name: np.concatenate([value, np.repeat(value[-1:], length - count, axis=0)])
                for name, value in host_batch.items()
            }
        rates = np.resize(np.asarray(rates, np.float32), length)
        return (
            self.runtime.place(host_batch, steps=True),
            self._replicated("task", np.int32(task)),
            self.runtime.replicate(rates),
            self._replicated("count", np.int32(count)),
        )

    def _block_program(self):
        if self._blocks is None:
            settings = self.machinery.settings
            self._blocks = steps.make_train_steps(self.runtime, settings, self.length)
        return self._blocks

    def _replicated(self, name: str, value: np.generic) -> jax.Array:
        """`value` on every device, placed again only when it changes (see
        `Runtime.replicate`): the task id once per task, a rate while it stays the same."""
        held = self._placed.get(name)
        if held is None or held[0] != value:
            held = (value, self.runtime.replicate(value))
            self._placed[name] = held
        return held[1]

    def _calibrate(self) -> None:
        """Times the single calls that choose K; chooses it after `CALIBRATION_STEPS`."""
        self._single_calls.append(time.perf_counter())
        if len(self._single_calls) < CALIBRATION_STEPS:
            return
        step_s = float(np.median(np.diff(self._single_calls[2:])))
        length = choose_length(step_s)
        self.length = int(self.runtime.broadcast_text(str(length)))
        if self.length > 1:
            self.console(
                f"steps_per_dispatch={self.length}: a step took {step_s * 1e3:.2f} ms, so"
                f" {self.length} run in one call (set --config.steps_per_dispatch to choose)"
            )


def choose_length(step_s: float) -> int:
    """K for steps of `step_s` seconds: the power of two nearest to `BLOCK_S` / `step_s`,
    1 to `MAX_STEPS`."""
    if step_s >= BLOCK_S:
        return 1
    return min(MAX_STEPS, 2 ** round(math.log2(BLOCK_S / max(step_s, 1e-6))))
