"""A run's results so far: its accuracy matrices and timings, what a checkpoint keeps of
them, and where they go: metrics.json and the plots (process 0, after every task), the live
scalars (TensorBoard, W&B) and the console."""

import copy
import importlib
import json
import sys
import threading
import time

import numpy as np

from cljax import metrics, tracking
from cljax.errors import warn
from cljax.run.clock import no_time
from cljax.run.console import Console
from cljax.run.plan import Plan
from cljax.runtime import Runtime
from cljax.workdir import METRICS_NAME

# A task's times logged as scalars (its checkpointing is only known after they are written).
TRACKED_TIMES = ("train_s", "data_wait_s", "eval_s")
# The plots are drawn after a task once this long has passed since the run started or they
# were last drawn (drawing them takes about 0.35 s: more than a whole task of a small
# benchmark), and always when the run ends.
PLOTS_EVERY_S = 30.0


class Results:
    """The run's results so far, written to metrics.json by process 0 after every task."""

    def __init__(self, plan: Plan, runtime: Runtime, console: Console, wall_start: float):
        self.plan = plan
        self.runtime = runtime
        self.console = console
        self.matrices = {name: np.zeros((0, plan.num_tasks)) for name in plan.accuracies}
        self.timings: list[dict] = []
        self.skipped_images: dict[str, None] = {}  # each image once, in the order found
        self.resumes = 0
        self.tracker: tracking.Tracker | None = None
        self.wall_start = wall_start
        self.path = plan.workdir.file(METRICS_NAME)
        self._plotted_at = time.monotonic()  # the first drawing, too, waits PLOTS_EVERY_S

    @property
    def acc(self) -> np.ndarray:
        """The top-1 accuracy matrix."""
        return self.matrices["top1"]

    @property
    def completed(self) -> int:
        return len(self.acc)

    def skipped(self, per_process: list[str]) -> None:
        """Records the undecodable images each process (a JSON list each) left out."""
        for names in per_process:
            self.skipped_images.update(dict.fromkeys(json.loads(names)))

    def open_tracker(self, first_step: int) -> None:
        """Starts the live scalars (TensorBoard, W&B) at the run's step `first_step`."""
        summary = [f"{name}/average_accuracy" for name in self.matrices]
        self.tracker = tracking.Tracker(
            self.plan.workdir.path,
            self.plan.logging,
            self.plan.resolved_config,
            summary + [f"{name}/forgetting" for name in self.matrices],
            self.runtime.is_main,
            first_step,
        )
        if self.tracker.wandb_location:
            self.console(f"W&B: {self.tracker.wandb_location}")

    def close_tracker(self, status: str) -> None:
        if self.tracker is not None:
            self.tracker.close(status)
            self.tracker = None

    def add_task(self, accuracies: dict[str, list[float]], timing: dict, step: int) -> None:
        """A finished task's accuracies on every task and its timing, and their scalars at
        the run's step `step`, written out before the task's checkpoint is taken: a run
        resumed from that checkpoint does not log them again."""
        for name, row in accuracies.items():
            self.matrices[name] = np.vstack([self.matrices[name], row])
        self.timings.append(_with_max_over_processes(self.runtime, timing))
        values = {}
        for name, acc in self.matrices.items():
            values.update({f"{name}/T{j}": value for j, value in enumerate(acc[-1])})
            values[f"{name}/average_accuracy"] = metrics.average_accuracy(acc)
            values[f"{name}/forgetting"] = metrics.average_forgetting(acc)
        values.update({f"time/{key}": timing[key] for key in TRACKED_TIMES})
        self.tracker.scalars(step, values)
        self.tracker.flush()

    def publish(self, task: int, checkpoint_s: float) -> None:
        """Adds the end-of-task checkpoint's time to the task's timing, then writes
        metrics.json (and the plots, if due: `PLOTS_EVERY_S`), and prints the task's line."""
        timing = dict(self.timings[-1])
        timing["checkpoint_s"] += checkpoint_s
        self.timings[-1] = _with_max_over_processes(self.runtime, timing)
        results = self.results("running")
        if self.runtime.is_main:
            self.plan.workdir.write_json(METRICS_NAME, results)
            due = time.monotonic() - self._plotted_at >= PLOTS_EVERY_S
            if due or task + 1 == self.plan.num_tasks:
                self.plot(results)
            else:
                _import_plots_in_the_background()
        if self.skipped_images and self.runtime.is_main:
            warn(
                f"{len(self.skipped_images)} images could not be decoded and were left out so"
                f" far (dataset.bad_images=skip), e.g. {next(iter(self.skipped_images))}"
            )
        seen = ", ".join(
            f"{name} {acc[-1, : task + 1].mean():.4f}" for name, acc in self.matrices.items()
        )
        self.console(
            f"task {task + 1}/{self.acc.shape[1]}: accuracy on seen tasks {seen}, train time"
            f" {results['train_time_s']:.1f}s"
        )

    def results(self, status: str, error: str | None = None) -> dict:
        """metrics.json: how the run stands (`status`) and its results so far."""
        train_time = sum(t["train_s"] for t in self.timings)
        data_wait = sum(t["data_wait_s"] for t in self.timings)
        return {
            "status": status,
            **({"error": error} if error else {}),
            **{
                key: value
                for name, acc in self.matrices.items()
                for key, value in _matrix_results(name, acc).items()
            },
            "train_time_s": train_time,
            "data_wait_s": data_wait,
            "data_wait_fraction": data_wait / train_time if train_time > 0 else 0.0,
            "checkpoint_time_s": sum(t["checkpoint_s"] for t in self.timings),
            "eval_time_s": sum(t["eval_s"] for t in self.timings),
            "wall_time_s": time.perf_counter() - self.wall_start,
            "num_devices": self.runtime.num_devices,
            "completed_tasks": self.completed,
            "resumes": self.resumes,
            "skipped_images": list(self.skipped_images),
            "task_timings": self.timings,
            "config": self.plan.resolved_config,
        }

    def progress(self, task_elapsed: dict | None = None) -> dict:
        """What a checkpoint keeps of the results: the results so far, the config and the
        layout it ran on, and (mid-task) the task's train time and data wait so far."""
        return {
            "matrices": {name: acc.tolist() for name, acc in self.matrices.items()},
            "timings": copy.deepcopy(self.timings),
            "skipped_images": list(self.skipped_images),
            "task_elapsed": task_elapsed or no_time(),
            "resumes": self.resumes,
            "config": self.plan.resolved_config,
            "num_devices": self.runtime.num_devices,
            "global_batch_size": self.plan.global_batch_size,
        }

    def load(self, progress: dict) -> None:
        """The results of the run a checkpoint was taken of, which this run continues."""
        num_tasks = self.acc.shape[1]
        self.matrices = {
            name: np.asarray(progress["matrices"][name], dtype=float).reshape(-1, num_tasks)
            for name in self.matrices
        }
        self.timings = list(progress["timings"])
        self.skipped_images = dict.fromkeys(progress["skipped_images"])
        self.resumes = progress["resumes"] + 1

    def write(self, status: str, error: str | None = None) -> None:
        if self.runtime.is_main:
            self.plan.workdir.write_json(METRICS_NAME, self.results(status, error))

    def plot(self, results: dict) -> None:
        """Process 0 draws the run's plots from `results` (what metrics.json holds)."""
        if self.runtime.is_main and self.completed:
            from cljax import plots  # matplotlib takes 0.5 s to import: only where it draws

            plots.write_run_plots(self.plan.workdir.path, results)
            self._plotted_at = time.monotonic()

    def print_final(self, model_path: str) -> dict:
        """Prints the accuracy tables and the run's line; returns the final results."""
        for name, acc in self.matrices.items():
            self.console(f"{name} accuracy\n{metrics.format_matrix(acc)}")
        results = self.results("finished")
        self.console(
            f"final_average_accuracy={results['final_average_accuracy']:.4f} "
            f"average_forgetting={results['average_forgetting']:.4f} "
            f"train_time_s={results['train_time_s']:.1f} metrics: {self.path} model:"
            f" {model_path}"
        )
        return results


def _import_plots_in_the_background() -> None:
    """Starts importing matplotlib (0.4 s) in a thread, during the next task's training, so
    that the plots at the end need not wait for it. Only once a task is done: started with
    the run, it held Python's lock while the steps were traced, and it made the run longer
    even where the programs were read back untraced (docs/performance.md). Drawing, later,
    waits for the import if it is still running; so does Python's exit (not a daemon: an
    import cut short by the exit would print errors)."""
    if "cljax.plots" not in sys.modules:
        threading.Thread(
            target=importlib.import_module, args=("cljax.plots",), name="import-plots"
        ).start()


def _with_max_over_processes(runtime: Runtime, timing: dict) -> dict:
    """Adds `<key>_max`: the largest value over all processes, for every timing."""
    keys = [key for key in timing if key.endswith("_s")]
    values = runtime.max_over_processes(np.asarray([timing[key] for key in keys]))
    return {**timing, **{f"{key}_max": float(v) for key, v in zip(keys, values, strict=True)}}


def _matrix_results(name: str, acc: np.ndarray) -> dict:
    """metrics.json's entries for one accuracy matrix: `accuracy_matrix` and its summary
    for top-1, `<name>_accuracy_matrix` and `<name>_*` for the others."""
    prefix = "" if name == "top1" else f"{name}_"
    summary = metrics.summary(acc) if len(acc) else {}
    return {
        f"{prefix}accuracy_matrix": acc.tolist(),
        **{f"{prefix}{key}": value for key, value in summary.items()},
    }
