"""The continual-learning task loop: `train_and_evaluate(config, workdir)`.

Read top to bottom: check the config, start the runtime, open the workdir and load the
data, build the model, strategy, buffer and jitted steps, then for each task train for
`epochs_per_task` epochs and evaluate on every task's test split. Returns the metrics it
writes to `<workdir>/metrics.json`, which always says how the run stands (`status`).
"""

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from cljax import buffer as buffer_lib
from cljax import components, configuration, metrics, optim, steps
from cljax import runtime as runtime_lib
from cljax import workdir as workdir_lib
from cljax.data import pipeline, scenarios, sources
from cljax.messages import ConfigError, RunFailed
from cljax.models import create_model
from cljax.strategies import STRATEGIES, Strategy

TOP_K = 5


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
        run = _build(config, runtime, dataset, directory)
        return _run_tasks(run, scenario, wall_start)


def _run_tasks(run: "_Run", scenario: scenarios.Scenario, wall_start: float) -> dict:
    """The task loop; whatever happens, metrics.json ends up saying how the run stands."""
    report = _Report(run, scenario.num_tasks, wall_start)
    state, rehearsal = None, run.init_rehearsal()
    try:
        with run.runtime.watchdog() as watchdog:
            for task in range(scenario.num_tasks):
                if state is None or run.strategy.reinitialise_each_task:
                    key = jax.random.fold_in(jax.random.key(run.config.seed), task)
                    state = run.init_state(key)
                elif run.config.optimizer.reset_each_task:
                    state = run.reset_optimizer(state)
                state = state.replace(
                    strategy_state=run.strategy.begin_task(
                        state.strategy_state, state.variables, task
                    )
                )
                train_rows = (
                    scenario.train_rows_up_to(task)
                    if run.strategy.trains_on_seen_tasks
                    else scenario.train_rows[task]
                )
                task_start = time.perf_counter()
                state, rehearsal, data_wait = _train_task(
                    run, watchdog, state, rehearsal, train_rows, task, scenario.num_tasks
                )
                eval_start = time.perf_counter()
                correct = _evaluate(run, state, run.dataset.test)
                accuracies = {
                    name: [hits[rows].mean() for rows in scenario.test_rows]
                    for name, hits in correct.items()
                }
                timing = {
                    "task": task,
                    "train_s": eval_start - task_start,
                    "data_wait_s": data_wait,
                    "eval_s": time.perf_counter() - eval_start,
                }
                report.task_done(task, accuracies, timing)
                watchdog.progress()
    except KeyboardInterrupt:
        report.write("interrupted")
        raise Interrupted(
            f"interrupted; {report.path} holds the {report.completed} finished task(s)"
        ) from None
    except BaseException as error:
        report.write("failed", error=str(error) or repr(error))
        raise
    report.write("finished")
    for name, acc in report.matrices.items():
        run.log(f"{name} accuracy\n{metrics.format_matrix(acc)}")
    results = report.results("finished")
    run.log(
        f"final_average_accuracy={results['final_average_accuracy']:.4f} "
        f"average_forgetting={results['average_forgetting']:.4f} "
        f"train_time_s={results['train_time_s']:.1f} metrics: {report.path}"
    )
    return results


class _Report:
    """The run's results so far, written to metrics.json by process 0 after every task."""

    def __init__(self, run: "_Run", num_tasks: int, wall_start: float):
        self.run = run
        self.matrices = {name: np.zeros((0, num_tasks)) for name in run.accuracies}
        self.timings: list[dict] = []
        self.wall_start = wall_start
        self.path = run.directory.file(workdir_lib.METRICS_NAME)

    @property
    def acc(self) -> np.ndarray:
        """The top-1 accuracy matrix."""
        return self.matrices["top1"]

    @property
    def completed(self) -> int:
        return len(self.acc)

    def task_done(self, task: int, accuracies: dict[str, list[float]], timing: dict) -> None:
        for name, row in accuracies.items():
            self.matrices[name] = np.vstack([self.matrices[name], row])
        self.timings.append(_with_max_over_processes(self.run.runtime, timing))
        self.write("running")
        train_time = sum(t["train_s"] for t in self.timings)
        seen = ", ".join(
            f"{name} {np.mean(row[: task + 1]):.4f}" for name, row in accuracies.items()
        )
        self.run.log(
            f"task {task + 1}/{self.acc.shape[1]}: accuracy on seen tasks {seen}, train time"
            f" {train_time:.1f}s"
        )

    def results(self, status: str, error: str | None = None) -> dict:
        results = {
            "status": status,
            **({"error": error} if error else {}),
            **{
                key: value
                for name, acc in self.matrices.items()
                for key, value in _matrix_results(name, acc).items()
            },
            "train_time_s": sum(t["train_s"] for t in self.timings),
            "data_wait_s": sum(t["data_wait_s"] for t in self.timings),
            "wall_time_s": time.perf_counter() - self.wall_start,
            "num_devices": self.run.runtime.num_devices,
            "completed_tasks": self.completed,
            "task_timings": self.timings,
            "config": self.run.resolved_config,
        }
        return results

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
    schedule: optim.Schedule
    accuracies: tuple[str, ...]
    resolved_config: dict
    log: "_Logger"

    @property
    def global_batch_size(self) -> int:
        return self.layout.global_batch_size


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
        )
    example = {
        "inputs": jax.ShapeDtypeStruct(dataset.input_shape, dataset.input_dtype),
        **strategy.stored_fields(dataset.num_classes),
    }
    if buffer is not None:
        slots = buffer.num_classes * buffer.budget_per_class
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
    )
    sample = pipeline.read_inputs(dataset.train, np.arange(1), views)
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
    resolved["dataset"].update(augment=views.augmentation, mean=settings.mean, std=settings.std)
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
        predict=steps.make_predict(runtime, settings, top_k),
        views=views,
        layout=layout,
        schedule=optim.schedule(
            config, runtime.num_devices, config.epochs_per_task, config.scenario.num_tasks
        ),
        accuracies=("top1", f"top{top_k}") if dataset.num_classes > TOP_K else ("top1",),
        resolved_config=resolved,
        log=_Logger(runtime, config.distributed.log_dir),
    )


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
        return sources.load(config.dataset.name, config.dataset.data_dir, config.dataset.image_size)
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
            print(message, flush=True)
        if self.path:
            with open(self.path, "a") as file:
                file.write(message + "\n")


def _with_max_over_processes(runtime: runtime_lib.Runtime, timing: dict) -> dict:
    """Adds `<key>_max`: the largest value over all processes, for every timing."""
    keys = [key for key in timing if key.endswith("_s")]
    values = runtime.max_over_processes(np.asarray([timing[key] for key in keys]))
    return {**timing, **{f"{key}_max": float(v) for key, v in zip(keys, values, strict=True)}}


def _train_task(run: _Run, watchdog, state, rehearsal, rows: np.ndarray, task: int, tasks: int):
    """Runs `epochs_per_task` epochs over `rows`; returns the states and the data wait.

    Each step's loss is checked once the next step is queued (so the check never stalls
    the device): a non-finite loss stops the run, naming where it happened.
    """
    config, runtime = run.config, run.runtime
    task_id = jnp.int32(task)
    steps_per_epoch = pipeline.steps_per_epoch(len(rows), run.global_batch_size)
    batches = pipeline.task_batches(
        run.dataset.train,
        rows,
        run.layout,
        run.views,
        seed=config.seed,
        task=task,
        epochs=config.epochs_per_task,
    )
    progress = tqdm(
        total=config.epochs_per_task * steps_per_epoch,
        desc=f"task {task + 1}/{tasks}",
        disable=None if runtime.is_main else True,
        leave=False,
    )
    prefetcher = pipeline.Prefetcher(batches, config.dataset.prefetch_depth)
    first_step_start = time.perf_counter() if task == 0 else None
    unchecked = None
    with progress, prefetcher:
        for index, host_batch in enumerate(prefetcher):
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
            state, rehearsal, step_metrics = run.train_step(
                state, rehearsal, batch, task_id, jnp.float32(learning_rate)
            )
            if unchecked is not None:
                _check_finite(run, *unchecked, task, tasks, steps_per_epoch)
            unchecked = (step_metrics, index)
            progress.update()
            watchdog.progress()
            if index == 0 and first_step_start is not None:
                jax.block_until_ready(step_metrics)
                seconds = time.perf_counter() - first_step_start
                run.log(f"first train step done in {seconds:.1f}s (compilation included)")
            if (index + 1) % steps_per_epoch == 0:
                progress.set_postfix(loss=f"{float(step_metrics['loss']):.3f}")
        if unchecked is not None:
            _check_finite(run, *unchecked, task, tasks, steps_per_epoch)
    jax.block_until_ready((state, rehearsal))
    return state, rehearsal, prefetcher.wait_s


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


def _evaluate(run: _Run, state: steps.TrainState, split) -> dict[str, np.ndarray]:
    """Per row of `split`, whether the label is the top prediction (`top1`) and among the
    top k (`top5`), from fixed-size sharded batches.

    Each process reads its part of each batch; the predictions of all processes are
    gathered so that every process computes the same accuracies.
    """
    runtime = run.runtime
    num_devices = runtime.num_devices
    batch_size = -(-run.config.eval_batch_size // num_devices) * num_devices
    top1, topk = [], []
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        mine, _ = pipeline.local_rows(
            rows, batch_size, runtime.process_index, runtime.process_count
        )
        inputs = runtime.place({"inputs": pipeline.read_inputs(split, mine, run.views)})
        best, ranked = run.predict(state, inputs["inputs"])
        top1.append(runtime.gather_rows(best)[: len(rows)])
        topk.append(runtime.gather_rows(ranked)[: len(rows)])
    labels = split.labels
    correct = {"top1": np.concatenate(top1) == labels}
    if len(run.accuracies) > 1:
        correct[run.accuracies[1]] = (np.concatenate(topk) == labels[:, None]).any(axis=1)
    return correct


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
        resolved["buffer"]["budget_per_class"] * dataset.num_classes * num_devices
    )
    return resolved
