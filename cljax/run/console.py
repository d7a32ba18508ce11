"""What a run prints: its lines (process 0) and every process's log file, and the progress
bar of its training."""

import os

from tqdm import tqdm

from cljax import workdir
from cljax.runtime import Runtime


class Console:
    """Prints on process 0; with `log_dir`, every process also appends to its own file."""

    def __init__(self, runtime: Runtime, log_dir: str | None):
        self.is_main = runtime.is_main
        self.path = None
        if log_dir:
            workdir.ensure_writable(log_dir, "distributed.log_dir")
            self.path = os.path.join(log_dir, f"process_{runtime.process_index}.log")

    def __call__(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)
        if self.path:
            with open(self.path, "a") as file:
                file.write(message + "\n")


def progress_bar(runtime: Runtime, total_samples: int, done_samples: int) -> tqdm:
    """One bar for the run's training, counted in samples: its rate is samples/s and its
    estimate the training time left (evaluation not included). Process 0 only, on a
    terminal only."""
    return tqdm(
        total=total_samples,
        initial=done_samples,
        unit=" samples",
        unit_scale=True,
        disable=None if runtime.is_main else True,
        leave=False,
        dynamic_ncols=True,
    )
