"""The continual-learning task loop: `train_and_evaluate(config, workdir)`.

Read top to bottom: check the config, start the runtime, open the workdir and load the
data, build the model, strategy, buffer and jitted steps, then for each task train for
`epochs_per_task` epochs and evaluate on every task's test split. Returns the metrics it
writes to `<workdir>/metrics.json`, which always says how the run stands (`status`).
"""

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from cljax import buffer as buffer_lib
from cljax import checkpoint as checkpoint_lib
from cljax import (
    components,
    configuration,
    metrics,
    optim,
    preemption,
    profiling,
    steps,
    tracking,
)
from cljax import runtime as runtime_lib
from cljax import workdir as workdir_lib
from cljax.data import pipeline, scenarios, sources
from cljax.messages import ConfigError, Preempted, RunFailed, warn
from cljax.models import create_model, per_device_batch_norm
from cljax.strategies import STRATEGIES, Strategy

TOP_K = 5
# The accuracy of predictions restricted to each test sample's own task's classes.
TASK_IL = "task_il"
# A task's times logged as scalars (its checkpointing is only known after they are written).
TRACKED_TIMES = ("train_s", "data_wait_s", "eval_s")


class Interrupted(RunFailed):
    """Ctrl-C: the run stopped between steps; metrics.json says what finished."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
    """Trains on every task in turn and evaluates after each; returns the metrics.

    Without `workdir`, the run gets a new directory under `runs/`.
    """
    wall_start = time.perf_counter()
    configuration.validate(config)
    runtime = runtime_lib.create(config)
    configuration.validate_memory_kind(config.buffer.memory_kind, runtime.memory_kinds())
    with _open_workdir(config, runtime, workdir) as directory:
        dataset = _load_dataset(config, runtime)
        configuration.validate_for_data(
            config,
            dataset.num_classes,
            len(dataset.train),
            runtime.num_devices,
            dataset.resizable,
            dataset.input_shape[-1],
        )
        scenario = make_scenario(config, dataset)
        configuration.validate_scenario(config, scenario, len(dataset.train), len(dataset.test))
        run = _build(config, runtime, dataset, scenario, directory)
        return _run_tasks(run, scenario, wall_start)


def _run_tasks(run: "_Run", scenario: scenarios.Scenario, wall_start: float) -> dict:
    """The task loop, from the run's latest checkpoint if it has one; whatever happens,
    metrics.json ends up saying how the run stands."""
    report = _Report(run, scenario.num_tasks, wall_start)
    task_rows = tuple(
        scenario.train_rows_up_to(task) if run.strategy.trains_on_seen_tasks else rows
        for task, rows in enumerate(scenario.train_rows)
    )
    clock = _Clock(
        [
            run.config.epochs_per_task * pipeline.steps_per_epoch(len(rows), run.global_batch_size)
            for rows in task_rows
        ],
        run.config.epochs_per_task,
    )
    checkpoints = checkpoint_lib.Checkpoints(
        run.directory.path, run.runtime, run.config.checkpoint.keep
    )
    try:
        state, rehearsal, start = _start(run, checkpoints, report, clock)
        report.open_tracker(clock.done_steps(start))
        feed = _feed(run, task_rows, start)
        watchdog = run.runtime.watchdog()
        watchdog.on_stop = lambda line: report.write("failed", line.removeprefix("cljax: "))
        with (
            watchdog,
            feed,
            preemption.Preemption(run.runtime) as preempt,
            _progress_bar(run, clock, start) as bar,
        ):
            for task in range(start.task, scenario.num_tasks):
                first = start if task == start.task else pipeline.Position(task)
                if (first.epoch, first.step) == (0, 0):
                    state = _begin_task(run, state, task)
                clock.begin_task(feed.wait_s)
                loop = _TaskLoop(run, watchdog, feed, checkpoints, preempt, report, clock, bar)
                state, rehearsal, skipped = loop.train(state, rehearsal, task, first)
                eval_start, eval_wait = time.perf_counter(), feed.wait_s
                correct, valid, eval_skipped = _evaluate(run, feed, state)
                watchdog.progress()
                accuracies = {
                    name: [hits[rows][valid[rows]].mean() for rows in scenario.test_rows]
                    for name, hits in correct.items()
                }
                report.skipped(run.runtime.all_texts(json.dumps([*skipped, *eval_skipped])))
                next_task = pipeline.Position(task + 1)
                done = clock.done_steps(next_task)
                report.add_task(accuracies, clock.end_task(task, eval_start, eval_wait), done)
                save_start = time.perf_counter()
                checkpoints.save(done, state, rehearsal, next_task, report.progress())
                watchdog.progress()
                report.publish(task, time.perf_counter() - save_start)
                watchdog.progress()
                if task + 1 < scenario.num_tasks and preempt.requested():
                    raise Preempted(_preempted_message(preempt, report, next_task))
            checkpoints.wait()
    except Preempted:
        _stop(checkpoints, report, "preempted")
        raise
    except KeyboardInterrupt:
        _stop(checkpoints, report, "interrupted")
        raise Interrupted(
            f"interrupted; {report.path} holds the {report.completed} finished task(s)"
        ) from None
    except BaseException as error:
        _stop(checkpoints, report, "failed", error=str(error) or repr(error))
        raise
    checkpoints.close()
    model_path = checkpoint_lib.export_model(run.directory.path, state, run.runtime)
    report.write("finished")
    report.close_tracker("finished")
    for name, acc in report.matrices.items():
        run.log(f"{name} accuracy\n{metrics.format_matrix(acc)}")
    results = report.results("finished")
    run.log(
        f"final_average_accuracy={results['final_average_accuracy']:.4f} "
        f"average_forgetting={results['average_forgetting']:.4f} "
        f"train_time_s={results['train_time_s']:.1f} metrics: {report.path} model: {model_path}"
    )
    return results


def _stop(checkpoints, report: "_Report", status: str, error: str | None = None) -> None:
    """Ends a run that did not finish: no more checkpoints, metrics.json says `status`."""
    checkpoints.close()
    report.write(status, error=error)
    report.close_tracker(status)


def _begin_task(run: "_Run", state, task: int) -> steps.TrainState:
    """The state a task starts from: fresh (the first task, or every task of a strategy
    that re-initialises; from `init_from` if set), else the last one with the optimizer
    reset if configured; then the strategy's own start of task."""
    if state is None or run.strategy.reinitialise_each_task:
        state = run.init_state(jax.random.fold_in(jax.random.key(run.config.seed), task))
        if run.config.init_from:
            state = checkpoint_lib.load_model(run.config.init_from, state)
    elif run.config.optimizer.reset_each_task:
        state = run.reset_optimizer(state)
    return state.replace(
        strategy_state=run.strategy.begin_task(state.strategy_state, state.variables, task)
    )


def _start(run: "_Run", checkpoints, report: "_Report", clock: "_Clock"):
    """(state, rehearsal, position) to start from: the latest checkpoint's, after checking
    that this run's config is the checkpointed one's; else a fresh start (state None)."""
    devices = run.runtime.num_devices
    earlier = run.directory.earlier_metrics()

    def check(progress: dict) -> None:
        checkpoint_lib.check_same_config(
            progress["config"],
            run.resolved_config,
            progress["num_devices"] == devices,
            run.directory.path,
        )

    restored = checkpoints.restore_latest(*_abstract_states(run), check)
    if restored is None:
        if earlier is not None and "config" in earlier:
            check({"config": earlier["config"], "num_devices": earlier["num_devices"]})
        return None, run.init_rehearsal(), pipeline.Position()
    report.load(restored.progress)
    clock.load(restored.progress)
    position = restored.position
    saved_devices = restored.progress["num_devices"]
    if saved_devices != devices:
        samples = position.step * restored.progress["global_batch_size"]
        position = dataclasses.replace(position, step=samples // run.global_batch_size)
    run.log(
        f"resuming from {checkpoints.path}/{restored.step}: task {position.task + 1}, epoch"
        f" {position.epoch + 1}, step {position.step + 1}"
        + (
            f" (saved on {saved_devices} devices, now {devices})"
            if saved_devices != devices
            else ""
        )
    )
    return restored.state, restored.rehearsal, position


def _abstract_states(run: "_Run") -> tuple:
    """Shapes, dtypes and shardings (with memory kinds) of the train and rehearsal states:
    what a checkpoint is restored into."""

    def placed(shapes, shardings):
        """`shapes` with the shardings of `shardings`, a prefix of it."""
        return jax.tree.map(
            lambda sharding, subtree: jax.tree.map(
                lambda shape: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
                subtree,
            ),
            shardings,
            shapes,
        )

    state = jax.eval_shape(run.init_state, jax.random.key(0))
    state = placed(state, run.runtime.replicated)
    buffer = run.settings.buffer
    if buffer is None:
        return state, None
    rehearsal = jax.eval_shape(run.init_rehearsal)
    shardings = steps.RehearsalState(
        buffer.shardings(run.runtime.sharded),
        run.runtime.sharded,
    )
    return state, placed(rehearsal, shardings)


def _preempted_message(preempt: preemption.Preemption, report: "_Report", position) -> str:
    return (
        f"{preempt.name}: saved a checkpoint at task {position.task + 1}, epoch"
        f" {position.epoch + 1}, step {position.step + 1}; run the same command to resume"
        f" ({report.path} says preempted)"
    )


class _Clock:
    """Steps and time: the run's step count at a position, and the current task's train
    time, data wait and checkpointing time (including what the run did in the task before it
    was resumed). Train time leaves out the time spent saving checkpoints."""

    def __init__(self, task_steps: list[int], epochs: int):
        self.task_steps = task_steps
        self.epochs = epochs
        self.carried = _no_time()
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
        self.carried = _no_time()
        return timing

    def load(self, progress: dict) -> None:
        self.carried = dict(progress["task_elapsed"])


def _no_time() -> dict:
    return {"train_s": 0.0, "data_wait_s": 0.0, "checkpoint_s": 0.0}


class _Report:
    """The run's results so far, written to metrics.json by process 0 after every task."""

    def __init__(self, run: "_Run", num_tasks: int, wall_start: float):
        self.run = run
        self.matrices = {name: np.zeros((0, num_tasks)) for name in run.accuracies}
        self.timings: list[dict] = []
        self.skipped_images: dict[str, None] = {}  # each image once, in the order found
        self.resumes = 0
        self.tracker: tracking.Tracker | None = None
        self.wall_start = wall_start
        self.path = run.directory.file(workdir_lib.METRICS_NAME)

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
            self.run.directory.path,
            self.run.config.logging,
            self.run.resolved_config,
            summary + [f"{name}/forgetting" for name in self.matrices],
            self.run.runtime.is_main,
            first_step,
        )
        if self.tracker.wandb_location:
            self.run.log(f"W&B: {self.tracker.wandb_location}")

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
        self.timings.append(_with_max_over_processes(self.run.runtime, timing))
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
        metrics.json and the plots, and prints the task's line."""
        timing = dict(self.timings[-1])
        timing["checkpoint_s"] += checkpoint_s
        self.timings[-1] = _with_max_over_processes(self.run.runtime, timing)
        results = self.results("running")
        if self.run.runtime.is_main:
            self.run.directory.write_json(workdir_lib.METRICS_NAME, results)
            from cljax import plots  # matplotlib takes 0.5 s to import: only where it draws

            plots.write_run_plots(self.run.directory.path, results)
        if self.skipped_images and self.run.runtime.is_main:
            warn(
                f"{len(self.skipped_images)} images could not be decoded and were left out so"
                f" far (dataset.bad_images=skip), e.g. {next(iter(self.skipped_images))}"
            )
        seen = ", ".join(
            f"{name} {acc[-1, : task + 1].mean():.4f}" for name, acc in self.matrices.items()
        )
        self.run.log(
            f"task {task + 1}/{self.acc.shape[1]}: accuracy on seen tasks {seen}, train time"
            f" {results['train_time_s']:.1f}s"
        )

    def results(self, status: str, error: str | None = None) -> dict:
        train_time = sum(t["train_s"] for t in self.timings)
        data_wait = sum(t["data_wait_s"] for t in self.timings)
        results = {
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
            "num_devices": self.run.runtime.num_devices,
            "completed_tasks": self.completed,
            "resumes": self.resumes,
            "skipped_images": list(self.skipped_images),
            "task_timings": self.timings,
            "config": self.run.resolved_config,
        }
        return results

    def progress(self, task_elapsed: dict | None = None) -> dict:
        """What a checkpoint keeps of the report: the results so far, the config and the
        layout it ran on, and (mid-task) the task's train time and data wait so far."""
        return {
            "matrices": {name: acc.tolist() for name, acc in self.matrices.items()},
            "timings": copy.deepcopy(self.timings),
            "skipped_images": list(self.skipped_images),
            "task_elapsed": task_elapsed or _no_time(),
            "resumes": self.resumes,
            "config": self.run.resolved_config,
            "num_devices": self.run.runtime.num_devices,
            "global_batch_size": self.run.global_batch_size,
        }

    def load(self, progress: dict) -> None:
        """The report of the run a checkpoint was taken of, which this run continues."""
        num_tasks = self.acc.shape[1]
        self.matrices = {
            name: np.asarray(progress["matrices"][name], dtype=float).reshape(-1, num_tasks)
            for name in self.matrices
        }
        self.timings = list(progress["timings"])
        self.skipped_images = dict.fromkeys(progress["skipped_images"])
        self.resumes = progress["resumes"] + 1

    def write(self, status: str, error: str | None = None) -> None:
        if self.run.runtime.is_main:
            self.run.directory.write_json(workdir_lib.METRICS_NAME, self.results(status, error))


@dataclasses.dataclass(frozen=True)
class _Run:
    """What stays the same for every task of a run."""

    config: ml_collections.ConfigDict
    runtime: runtime_lib.Runtime
    directory: workdir_lib.Workdir
    dataset: sources.Dataset
    strategy: Strategy
    settings: steps.StepConfig
    init_state: Callable[[jax.Array], steps.TrainState]
    reset_optimizer: Callable[[steps.TrainState], steps.TrainState]
    init_rehearsal: Callable[[], steps.RehearsalState | None]
    train_step: Callable
    predict: Callable
    views: pipeline.Views
    layout: pipeline.Layout
    worker_count: int
    schedule: optim.Schedule
    accuracies: tuple[str, ...]
    class_tasks: np.ndarray | None
    resolved_config: dict
    log: "_Logger"

    @property
    def global_batch_size(self) -> int:
        return self.layout.global_batch_size

    @property
    def eval_batch_size(self) -> int:
        """The global evaluation batch, a multiple of the number of devices."""
        devices = self.runtime.num_devices
        return -(-self.config.eval_batch_size // devices) * devices


def _open_workdir(config, runtime: runtime_lib.Runtime, path: str | None) -> workdir_lib.Workdir:
    """The run's directory (a new one under runs/ if `path` is None), agreed by all
    processes; it is opened (checked and locked) on entering the returned context."""
    created = path is None
    if created:
        default = (
            workdir_lib.default_path(config.dataset.name, config.strategy.name)
            if runtime.is_main
            else None
        )
        path = runtime.broadcast_text(default)
    return workdir_lib.Workdir(path, is_main=runtime.is_main, created=created)


def _build(
    config: ml_collections.ConfigDict,
    runtime: runtime_lib.Runtime,
    dataset: sources.Dataset,
    scenario: scenarios.Scenario,
    directory: workdir_lib.Workdir,
) -> _Run:
    """Model, strategy, buffer and the jitted steps for this run."""
    strategy = build_strategy(config.strategy)
    resolved = _resolved_config(config, dataset, runtime.num_devices)
    buffer = None
    if strategy.uses_buffer:
        buffer = buffer_lib.rehearsal_buffer(
            num_classes=dataset.num_classes,
            budget_per_class=resolved["buffer"]["budget_per_class"],
            num_candidates=config.buffer.num_candidates,
            num_representatives=config.buffer.num_representatives,
            policy=config.buffer.policy,
            memory_kind=config.buffer.memory_kind,
            partition=config.buffer.partition,
        )
    example = {
        "inputs": jax.ShapeDtypeStruct(dataset.input_shape, dataset.input_dtype),
        **strategy.stored_fields(dataset.num_classes),
    }
    if buffer is not None:
        slots = buffer.num_partitions * buffer.budget_per_class
        configuration.validate_buffer_memory(
            config,
            slots * buffer_lib.record_bytes(example),
            *runtime.memory_per_device(buffer.memory_kind),
        )
    dtype = jnp.dtype(config.dtype)
    views = pipeline.Views(
        pipeline.resolve_augmentation(config.dataset.augment, dataset), dataset.image_size
    )
    settings = steps.StepConfig(
        model=create_model(config.model, dataset.num_classes, dtype, runtime.collectives),
        optimizer=optim.create(config),
        strategy=strategy,
        max_value=dataset.max_value,
        mean=tuple(config.dataset.mean or dataset.mean),
        std=tuple(config.dataset.std or dataset.std),
        dtype=dtype,
        augmentation=views.augmentation,
        label_smoothing=config.label_smoothing,
        buffer=buffer,
        augment_from_task=config.buffer.augment_from_task,
        average_model_state=per_device_batch_norm(config.model),
    )
    sample = pipeline.read_inputs(dataset.train, np.arange(1), views, dataset.input_shape)
    init_state = jax.jit(
        lambda key: steps.create_train_state(settings, sample, key),
        out_shardings=runtime.replicated,
    )
    reset_optimizer = jax.jit(
        lambda state: state.replace(opt_state=settings.optimizer.init(state.params)),
        out_shardings=runtime.replicated,
        donate_argnums=0,
    )
    layout = pipeline.Layout(
        global_batch_size=config.batch_size * runtime.num_devices,
        process_index=runtime.process_index,
        process_count=runtime.process_count,
        local_devices=len(runtime.mesh.local_devices),
        num_candidates=config.buffer.num_candidates if buffer and views.crops_on_host else 0,
    )

    def init_rehearsal() -> steps.RehearsalState | None:
        if buffer is None:
            return None
        return steps.RehearsalState(
            buffer.init_sharded(example, runtime.sharded),
            buffer.empty_representatives_sharded(example, runtime.sharded),
        )

    top_k = min(TOP_K, dataset.num_classes)
    class_tasks = _class_tasks(config, scenario, dataset.num_classes)
    accuracies = ("top1", f"top{top_k}") if dataset.num_classes > TOP_K else ("top1",)
    worker_count = pipeline.resolve_worker_count(
        config.dataset.worker_count, dataset, runtime.cores_of_this_process()
    )
    resolved["dataset"].update(
        augment=views.augmentation,
        mean=settings.mean,
        std=settings.std,
        worker_count=worker_count,
    )
    return _Run(
        config=config,
        runtime=runtime,
        directory=directory,
        dataset=dataset,
        strategy=strategy,
        settings=settings,
        init_state=init_state,
        reset_optimizer=reset_optimizer,
        init_rehearsal=init_rehearsal,
        train_step=steps.make_train_step(runtime, settings),
        predict=steps.make_predict(runtime, settings, top_k, class_tasks),
        views=views,
        layout=layout,
        worker_count=worker_count,
        schedule=optim.schedule(
            config, runtime.num_devices, config.epochs_per_task, config.scenario.num_tasks
        ),
        accuracies=accuracies if class_tasks is None else (*accuracies, TASK_IL),
        class_tasks=class_tasks,
        resolved_config=resolved,
        log=_Logger(runtime, config.distributed.log_dir),
    )


def _class_tasks(config, scenario: scenarios.Scenario, num_classes: int) -> np.ndarray | None:
    """Each class's task, where task-IL accuracy means something: a class-incremental
    scenario of more than one task (else None)."""
    if config.scenario.name != "class_incremental" or scenario.num_tasks < 2:
        return None
    class_tasks = np.zeros(num_classes, np.int32)
    for task, classes in enumerate(scenario.task_classes):
        class_tasks[classes] = task
    return class_tasks


def build_strategy(config: ml_collections.ConfigDict) -> Strategy:
    """Strategy `config.name` with its hyperparameters `config[config.name]`."""
    return components.build(
        "strategy", config.name, STRATEGIES[config.name], config.get(config.name, {})
    )


def _load_dataset(config: ml_collections.ConfigDict, runtime) -> sources.Dataset:
    """The dataset of `config.dataset`; process 0 builds a missing built-in one first."""
    try:
        if runtime.is_main:
            sources.build_if_builtin(config.dataset.name, config.dataset.data_dir)
        runtime.barrier("cljax-dataset-built")
        return sources.load(
            config.dataset.name,
            config.dataset.data_dir,
            config.dataset.image_size,
            config.dataset.path,
        )
    except sources.DatasetError as error:
        raise ConfigError(str(error)) from error


class _Logger:
    """Prints on process 0; with `log_dir`, every process also appends to its own file."""

    def __init__(self, runtime: runtime_lib.Runtime, log_dir: str | None):
        self.is_main = runtime.is_main
        self.path = None
        if log_dir:
            workdir_lib.ensure_writable(log_dir, "distributed.log_dir")
            self.path = f"{log_dir}/process_{runtime.process_index}.log"

    def __call__(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)
        if self.path:
            with open(self.path, "a") as file:
                file.write(message + "\n")


def _with_max_over_processes(runtime: runtime_lib.Runtime, timing: dict) -> dict:
    """Adds `<key>_max`: the largest value over all processes, for every timing."""
    keys = [key for key in timing if key.endswith("_s")]
    values = runtime.max_over_processes(np.asarray([timing[key] for key in keys]))
    return {**timing, **{f"{key}_max": float(v) for key, v in zip(keys, values, strict=True)}}


def _feed(
    run: "_Run", task_rows: tuple[np.ndarray, ...], start: pipeline.Position
) -> pipeline.Prefetcher:
    """Every batch of the run from `start`, in order (each task's steps, then its
    evaluation), made by the input pipeline's workers and handed over by the prefetch
    thread."""
    config, dataset = run.config, run.dataset
    loader = pipeline.Loader(
        train=dataset.train,
        test=dataset.test,
        task_rows=task_rows,
        layout=run.layout,
        views=run.views,
        input_shape=dataset.input_shape,
        seed=config.seed,
        eval_batch_size=run.eval_batch_size,
        bad_images=config.dataset.bad_images,
    )
    items = pipeline.plan(
        task_rows,
        len(dataset.test),
        config.epochs_per_task,
        run.global_batch_size,
        run.eval_batch_size,
        start,
    )
    return pipeline.Prefetcher(
        pipeline.batches(loader, items, run.worker_count, config.dataset.workers),
        config.dataset.prefetch_depth,
    )


def _progress_bar(run: _Run, clock: _Clock, start: pipeline.Position) -> tqdm:
    """One bar for the run's training, counted in samples: its rate is samples/s and its
    estimate the training time left (evaluation not included). Process 0 only, on a
    terminal only."""
    return tqdm(
        total=clock.total_steps * run.global_batch_size,
        initial=clock.done_steps(start) * run.global_batch_size,
        unit=" samples",
        unit_scale=True,
        disable=None if run.runtime.is_main else True,
        leave=False,
        dynamic_ncols=True,
    )


class _StepScalars:
    """The training scalars, every `logging.every_steps` steps of the run: the loss and its
    terms, the representatives' weight, the learning rate, and the samples/s and fraction
    of time spent waiting for data since the last point."""

    def __init__(self, run: _Run, tracker: tracking.Tracker, feed):
        self.every = run.config.logging.every_steps
        self.global_batch_size = run.global_batch_size
        self.tracker = tracker
        self.feed = feed
        self.since = (0, 0.0, 0.0)

    def restart(self, done: int) -> None:
        """Measures speed from here (after a step that compiled, or an evaluation)."""
        self.since = (done, time.perf_counter(), self.feed.wait_s)

    def at(self, done: int, step_metrics: dict, learning_rate: float) -> None:
        if done % self.every:
            return
        values = {f"train/{key}": value for key, value in jax.device_get(step_metrics).items()}
        steps_done, start, wait_start = self.since
        seconds = time.perf_counter() - start
        values["train/learning_rate"] = learning_rate
        if done > steps_done and seconds > 0:
            values["perf/samples_per_s"] = (done - steps_done) * self.global_batch_size / seconds
            values["perf/data_wait_fraction"] = (self.feed.wait_s - wait_start) / seconds
        self.tracker.scalars(done, values)
        self.restart(done)


class _Replicated:
    """One step argument's host value on every device, copied there again only when it
    changes: the task id once per task, a learning rate once for as long as it stays the
    same (see `Runtime.replicate`)."""

    def __init__(self, runtime: runtime_lib.Runtime, dtype: type[np.generic]):
        self.runtime = runtime
        self.dtype = dtype
        self.value, self.placed = None, None

    def __call__(self, value: float) -> jax.Array:
        value = self.dtype(value)
        if value != self.value:
            self.value, self.placed = value, self.runtime.replicate(value)
        return self.placed


class _TaskLoop:
    """The training steps of one task, with the checkpoints, the preemption checks and the
    training scalars between them."""

    def __init__(self, run, watchdog, feed, checkpoints, preempt, report, clock, bar):
        self.run = run
        self.watchdog = watchdog
        self.feed = feed
        self.checkpoints = checkpoints
        self.preempt = preempt
        self.report = report
        self.clock = clock
        self.bar = bar
        self.scalars = _StepScalars(run, report.tracker, feed)
        self.task_id = _Replicated(run.runtime, np.int32)
        self.learning_rate = _Replicated(run.runtime, np.float32)
        self.profile = profiling.StepProfile(
            os.path.join(run.directory.file("profile"), f"process_{run.runtime.process_index}"),
            run.config.logging.profile_from_step,
            run.config.logging.profile_steps,
        )

    def train(self, state, rehearsal, task: int, first: pipeline.Position):
        """Runs `task`'s steps from `first`, taking their batches from the feed; returns
        the states and the names of images left out as undecodable.

        Each step's loss is checked once the next step is queued (so the check never
        stalls the device): a non-finite loss stops the run, naming where it happened. A
        checkpoint is only taken of a state whose loss was checked.
        """
        run, clock = self.run, self.clock
        config, runtime = run.config, run.runtime
        task_id = self.task_id(task)
        steps, steps_per_epoch = clock.task_steps[task], clock.steps_per_epoch(task)
        begin = first.epoch * steps_per_epoch + first.step
        self.bar.set_description(f"task {task + 1}/{len(clock.task_steps)}")
        timed_start = time.perf_counter() if begin == 0 and task == 0 else None
        unchecked, skipped = None, []
        with self.profile:
            for index in range(begin, steps):
                host_batch = next(self.feed)
                skipped.extend(host_batch.pop("skipped").tolist())
                batch = runtime.place(host_batch)
                epoch, step = divmod(index, steps_per_epoch)
                learning_rate = run.schedule(
                    optim.scope_epoch(
                        config.optimizer.schedule_scope,
                        task,
                        epoch,
                        step,
                        steps_per_epoch,
                        config.epochs_per_task,
                    )
                )
                done_before = clock.done_steps(pipeline.Position(task, epoch, step))
                if self.profile.starts_at(done_before):
                    jax.block_until_ready((state, rehearsal))
                    self.profile.start(done_before)
                step_args = (batch, task_id, self.learning_rate(learning_rate))
                state, rehearsal, step_metrics = run.train_step(state, rehearsal, *step_args)
                if unchecked is not None:
                    self._check_finite(*unchecked, task)
                unchecked = (step_metrics, index)
                self.bar.update(run.global_batch_size)
                self.watchdog.progress()
                after = pipeline.Position(task, *divmod(index + 1, steps_per_epoch))
                done = clock.done_steps(after)
                if index == begin:
                    self.scalars.restart(done)
                if timed_start is not None and index == 0:
                    jax.block_until_ready(step_metrics)
                    seconds = time.perf_counter() - timed_start
                    run.log(f"first train step done in {seconds:.1f}s (compilation included)")
                if (index + 1) % steps_per_epoch == 0:
                    self.bar.set_postfix(loss=f"{float(step_metrics['loss']):.3f}")
                self.scalars.at(done, step_metrics, float(learning_rate))
                if self.profile.ends_at(done, task_ends=index + 1 == steps):
                    self._finish_profile(done, (state, rehearsal, *step_args))
                stop = self.preempt.requested(done)
                every = config.checkpoint.every_steps
                if index + 1 < steps and (stop or (every and done % every == 0)):
                    self._check_finite(*unchecked, task)
                    unchecked = None
                    self.save(done, state, rehearsal, after)
                if stop:
                    raise Preempted(_preempted_message(self.preempt, self.report, after))
        if unchecked is not None:
            self._check_finite(*unchecked, task)
        jax.block_until_ready((state, rehearsal))
        return state, rehearsal, skipped

    def _finish_profile(self, done: int, step_args: tuple) -> None:
        """Ends the profile once the traced steps have run; the step's HLO text comes from
        the compiled step already in memory."""
        jax.block_until_ready(step_args)
        folder, summary = self.profile.finish(
            done, lambda: self.run.train_step.lower(*step_args).compile().as_text()
        )
        self.run.log(f"profiled {summary['steps']} steps: {folder} (summary.json, TensorBoard)")

    def save(self, done: int, state, rehearsal, position: pipeline.Position) -> None:
        elapsed = self.clock.elapsed(self.feed.wait_s)
        self.report.tracker.flush()
        start = time.perf_counter()
        self.checkpoints.save(
            done, state, rehearsal, position, self.report.progress(task_elapsed=elapsed)
        )
        self.clock.add_checkpoint_time(time.perf_counter() - start)

    def _check_finite(self, step_metrics: dict, index: int, task: int) -> None:
        _check_finite(
            self.run,
            step_metrics,
            index,
            task,
            len(self.clock.task_steps),
            self.clock.steps_per_epoch(task),
        )


def _check_finite(
    run: _Run, step_metrics: dict, index: int, task: int, tasks: int, steps_per_epoch: int
) -> None:
    """Raises `RunFailed` if the loss of the step at `index` (within the task) is not finite."""
    loss = float(step_metrics["loss"])
    if math.isfinite(loss):
        return
    epoch, step = divmod(index, steps_per_epoch)
    raise RunFailed(
        f"the loss became {loss} at task {task + 1}/{tasks}, epoch {epoch + 1}/"
        f"{run.config.epochs_per_task}, step {step + 1}/{steps_per_epoch}; lower"
        f" --config.optimizer.learning_rate (now {run.config.optimizer.learning_rate:g}) or"
        " check the data"
    )


def make_scenario(config: ml_collections.ConfigDict, dataset) -> scenarios.Scenario:
    """The tasks of `scenario.name` over the dataset's splits."""
    name, num_tasks = config.scenario.name, config.scenario.num_tasks
    sizes = (len(dataset.train), len(dataset.test), dataset.num_classes)
    if name == "joint":
        return scenarios.joint(*sizes)
    if name == "instance_incremental":
        return scenarios.instance_incremental(*sizes, num_tasks, config.seed)
    return scenarios.class_incremental(
        dataset.train.labels,
        dataset.test.labels,
        dataset.num_classes,
        num_tasks,
        initial_increment=config.scenario.initial_increment,
        increment=config.scenario.increment,
        shuffle_seed=config.scenario.class_order_seed,
    )


def _evaluate(run: _Run, feed, state: steps.TrainState) -> tuple[dict, np.ndarray, list]:
    """Per row of the test split, whether the label is the top prediction (`top1`), among
    the top k (`top5`), and (`task_il`, class-incremental scenarios) the top prediction among
    its task's classes; which rows hold a sample; the images left out as undecodable.

    The batches come from `feed` (planned after the task's steps), each process's part of
    each; the predictions of all processes are gathered so that every process computes the
    same accuracies.
    """
    runtime, test = run.runtime, run.dataset.test
    predictions, valid, skipped = [], [], []
    for start in range(0, len(test), run.eval_batch_size):
        count = min(run.eval_batch_size, len(test) - start)
        host_batch = next(feed)
        skipped.extend(host_batch.pop("skipped").tolist())
        batch = runtime.place(host_batch)
        predicted = run.predict(state, batch["inputs"])
        predictions.append([runtime.gather_rows(rows)[:count] for rows in predicted])
        valid.append(runtime.gather_rows(batch["valid"])[:count])
    best, ranked, per_task = (np.concatenate(column) for column in zip(*predictions, strict=True))
    labels = test.labels
    correct = {"top1": best == labels}
    for name in run.accuracies[1:]:
        if name == TASK_IL:
            own_task = per_task[np.arange(len(labels)), run.class_tasks[labels]]
            correct[name] = own_task == labels
        else:
            correct[name] = (ranked == labels[:, None]).any(axis=1)
    return correct, np.concatenate(valid), skipped


def _matrix_results(name: str, acc: np.ndarray) -> dict:
    """metrics.json's entries for one accuracy matrix: `accuracy_matrix` and its summary
    for top-1, `top5_accuracy_matrix` and `top5_*` for top-5."""
    prefix = "" if name == "top1" else f"{name}_"
    summary = metrics.summary(acc) if len(acc) else {}
    return {
        f"{prefix}accuracy_matrix": acc.tolist(),
        **{f"{prefix}{key}": value for key, value in summary.items()},
    }


def _resolved_config(config, dataset, num_devices: int) -> dict:
    """The config as run, with the derived per-class budget filled in."""
    resolved = config.to_dict()
    resolved["buffer"]["budget_per_class"] = configuration.budget_per_class(
        config.buffer, len(dataset.train), dataset.num_classes, num_devices
    )
    resolved["buffer"]["total_slots"] = (
        resolved["buffer"]["budget_per_class"]
        * configuration.num_partitions(config.buffer, dataset.num_classes)
        * num_devices
    )
    return resolved
