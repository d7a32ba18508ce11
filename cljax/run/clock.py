"""Steps and time of a run: which step of the run a position is, and each task's train
time, data wait and checkpointing."""

import time

from cljax.data import pipeline


class Clock:
    """Steps and time: the run's step count at a position, and the current task's train
    time, data wait and checkpointing time (including what the run did in the task before it
    was resumed). Train time leaves out the time spent saving checkpoints."""

    def __init__(self, task_steps: list[int], epochs: int):
        self.task_steps = task_steps
        self.epochs = epochs
        self.carried = no_time()
        self._task_start = self._wait_start = self._checkpoint_s = 0.0

    @property
    def total_steps(self) -> int:
        return sum(self.task_steps)

    def steps_per_epoch(self, task: int) -> int:
        return self.task_steps[task] // self.epochs

    def done_steps(self, position: pipeline.Position) -> int:
        """Training steps of the run done before `position`."""
        done = sum(self.task_steps[: position.task])
        if position.task < len(self.task_steps):
            done += position.epoch * self.steps_per_epoch(position.task) + position.step
        return done

    def begin_task(self, wait_s: float) -> None:
        self._task_start, self._wait_start = time.perf_counter(), wait_s
        self._checkpoint_s = 0.0

    def add_checkpoint_time(self, seconds: float) -> None:
        """Time training waited for a checkpoint to be saved."""
        self._checkpoint_s += seconds

    def elapsed(self, wait_s: float, until: float | None = None) -> dict:
        """This task's train time, data wait and checkpointing up to `until` (None: now)."""
        until = time.perf_counter() if until is None else until
        return {
            "train_s": self.carried["train_s"] + until - self._task_start - self._checkpoint_s,
            "data_wait_s": self.carried["data_wait_s"] + wait_s - self._wait_start,
            "checkpoint_s": self.carried["checkpoint_s"] + self._checkpoint_s,
        }

    def end_task(self, task: int, eval_start: float, wait_s: float) -> dict:
        """The finished task's timing: training (to `eval_start`), data wait, checkpointing
        and evaluation."""
        timing = {"task": task, **self.elapsed(wait_s, eval_start)}
        timing["eval_s"] = time.perf_counter() - eval_start
        self.carried = no_time()
        return timing

    def load(self, progress: dict) -> None:
        self.carried = dict(progress["task_elapsed"])


def no_time() -> dict:
    return {"train_s": 0.0, "data_wait_s": 0.0, "checkpoint_s": 0.0}
