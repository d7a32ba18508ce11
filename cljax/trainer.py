"""The continual-learning task loop: `train_and_evaluate(config, workdir)`.

Read top to bottom: check the config, start the runtime and load the data, build the model,
strategy, buffer and jitted steps, then for each task train for `epochs_per_task` epochs and
evaluate on every task's test split. Returns the metrics it writes to
`<workdir>/metrics.json`.
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from cljax import buffer as buffer_lib
from cljax import components, configuration, metrics, steps
from cljax import runtime as runtime_lib
from cljax.data import pipeline, scenarios, sources
from cljax.models import create_model
from cljax.strategies import STRATEGIES, Strategy


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains on every task in turn and evaluates after each; returns the metrics."""
    wall_start = time.perf_counter()
    configuration.validate(config)
    _check_workdir(workdir)
    runtime = runtime_lib.create(config)
    configuration.validate_memory_kind(
        config.buffer.memory_kind,
        [memory.kind for memory in runtime.mesh.devices.flat[0].addressable_memories()],
    )
    dataset = _load_dataset(config, runtime)
    configuration.validate_for_data(
        config, dataset.num_classes, len(dataset.train), runtime.num_devices
    )
    run = _build(config, runtime, dataset)
    scenario = make_scenario(config, dataset)
    log = run.log

    acc = np.zeros((scenario.num_tasks, scenario.num_tasks))
    state, rehearsal = None, run.init_rehearsal()
    timings = []
    with runtime.watchdog() as watchdog:
        for task in range(scenario.num_tasks):
            if state is None or run.strategy.reinitialise_each_task:
                state = run.init_state(jax.random.fold_in(jax.random.key(config.seed), task))
            state = state.replace(
                strategy_state=run.strategy.begin_task(state.strategy_state, state.variables, task)
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
            predicted = _predict_all(run, state, dataset.test)
            correct = predicted == dataset.test.labels
            acc[task] = [correct[rows].mean() for rows in scenario.test_rows]
            timings.append(
                _with_max_over_processes(
                    runtime,
                    {
                        "task": task,
                        "train_s": eval_start - task_start,
                        "data_wait_s": data_wait,
                        "eval_s": time.perf_counter() - eval_start,
                    },
                )
            )
            watchdog.progress()
            train_time = sum(timing["train_s"] for timing in timings)
            results = {
                "accuracy_matrix": acc[: task + 1].tolist(),
                **metrics.summary(acc[: task + 1]),
                "train_time_s": train_time,
                "data_wait_s": sum(timing["data_wait_s"] for timing in timings),
                "wall_time_s": time.perf_counter() - wall_start,
                "num_devices": runtime.num_devices,
                "completed_tasks": task + 1,
                "task_timings": timings,
                "config": run.resolved_config,
            }
            if runtime.is_main:
                _write_json(workdir, "metrics.json", results)
            log(
                f"task {task + 1}/{scenario.num_tasks}: accuracy on seen tasks "
                f"{acc[task, : task + 1].mean():.4f}, train time {train_time:.1f}s"
            )

    log(metrics.format_matrix(acc))
    log(
        f"final_average_accuracy={results['final_average_accuracy']:.4f} "
        f"average_forgetting={results['average_forgetting']:.4f} "
        f"train_time_s={train_time:.1f} metrics: {os.path.join(workdir, 'metrics.json')}"
    )
    return results


@dataclasses.dataclass(frozen=True)
class _Run:
    """What stays the same for every task of a run."""

    config: ml_collections.ConfigDict
    runtime: runtime_lib.Runtime
    dataset: sources.Dataset
    strategy: Strategy
    settings: steps.StepConfig
    init_state: Callable[[jax.Array], steps.TrainState]
    init_rehearsal: Callable[[], steps.RehearsalState | None]
    train_step: Callable
    predict: Callable
    resolved_config: dict
    log: "_Logger"

    @property
    def global_batch_size(self) -> int:
        return self.config.batch_size * self.runtime.num_devices


def _build(config: ml_collections.ConfigDict, runtime, dataset: sources.Dataset) -> _Run:
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
    settings = steps.StepConfig(
        model=create_model(config.model, dataset.num_classes),
        optimizer=optax.adam(config.learning_rate),
        strategy=strategy,
        max_value=dataset.max_value,
        buffer=buffer,
        augment_from_task=config.buffer.augment_from_task,
    )
    sample = steps.normalise(dataset.train.read(np.arange(1)), dataset.max_value)
    init_state = jax.jit(
        lambda key: steps.create_train_state(settings, sample, key),
        out_shardings=runtime.replicated,
    )
    example = {
        "inputs": jax.ShapeDtypeStruct(dataset.input_shape, dataset.input_dtype),
        **strategy.stored_fields(dataset.num_classes),
    }

    def init_rehearsal() -> steps.RehearsalState | None:
        if buffer is None:
            return None
        return steps.RehearsalState(
            buffer.init_sharded(example, runtime.sharded),
            buffer.empty_representatives_sharded(example, runtime.sharded),
        )

    return _Run(
        config=config,
        runtime=runtime,
        dataset=dataset,
        strategy=strategy,
        settings=settings,
        init_state=init_state,
        init_rehearsal=init_rehearsal,
        train_step=steps.make_train_step(runtime, settings),
        predict=steps.make_predict(runtime, settings.model, dataset.max_value, top_k=1),
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
    if runtime.is_main:
        sources.build_if_builtin(config.dataset.name, config.dataset.data_dir)
    runtime.barrier("cljax-dataset-built")
    try:
        return sources.load(config.dataset.name, config.dataset.data_dir, config.dataset.image_size)
    except sources.DatasetNotPrepared as error:
        raise configuration.ConfigError(str(error)) from error


class _Logger:
    """Prints on process 0; with `log_dir`, every process also appends to its own file."""

    def __init__(self, runtime: runtime_lib.Runtime, log_dir: str | None):
        self.is_main = runtime.is_main
        self.path = None
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self.path = os.path.join(log_dir, f"process_{runtime.process_index}.log")

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
    """Runs `epochs_per_task` epochs over `rows`; returns the states and the data wait."""
    config, runtime = run.config, run.runtime
    task_id = jnp.int32(task)
    steps_per_epoch = pipeline.steps_per_epoch(len(rows), run.global_batch_size)
    augment = config.dataset.augment
    batches = pipeline.task_batches(
        run.dataset.train,
        rows,
        run.global_batch_size,
        seed=config.seed,
        task=task,
        epochs=config.epochs_per_task,
        augment=run.dataset.natural_images if augment is None else augment,
        process_index=runtime.process_index,
        process_count=runtime.process_count,
    )
    progress = tqdm(
        total=config.epochs_per_task * steps_per_epoch,
        desc=f"task {task + 1}/{tasks}",
        disable=None if runtime.is_main else True,
        leave=False,
    )
    prefetcher = pipeline.Prefetcher(batches, config.dataset.prefetch_depth)
    first_step_start = time.perf_counter() if task == 0 else None
    with progress, prefetcher:
        for step, host_batch in enumerate(prefetcher, start=1):
            batch = runtime.place(host_batch)
            state, rehearsal, step_metrics = run.train_step(state, rehearsal, batch, task_id)
            progress.update()
            watchdog.progress()
            if step == 1 and first_step_start is not None:
                jax.block_until_ready(step_metrics)
                seconds = time.perf_counter() - first_step_start
                run.log(f"first train step done in {seconds:.1f}s (compilation included)")
            if step % steps_per_epoch == 0:
                progress.set_postfix(loss=f"{float(step_metrics['loss']):.3f}")
    jax.block_until_ready((state, rehearsal))
    return state, rehearsal, prefetcher.wait_s


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


def _predict_all(run: _Run, state: steps.TrainState, split) -> np.ndarray:
    """Predicted classes for every row of `split`, in fixed-size sharded batches.

    Each process reads its part of each batch; the predictions of all processes are
    gathered so that every process computes the same accuracies.
    """
    runtime = run.runtime
    num_devices = runtime.num_devices
    batch_size = -(-run.config.eval_batch_size // num_devices) * num_devices
    predictions = []
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        mine, _ = pipeline.local_rows(
            rows, batch_size, runtime.process_index, runtime.process_count
        )
        batch = runtime.place({"inputs": split.read(mine)})["inputs"]
        top1, _ = run.predict(state, batch)
        predictions.append(runtime.gather_rows(top1)[: len(rows)])
    return np.concatenate(predictions)


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


def _check_workdir(workdir: str) -> None:
    """Refuses to overwrite the results of an earlier run."""
    if os.path.exists(os.path.join(workdir, "metrics.json")):
        raise configuration.ConfigError(
            f"workdir={workdir} already holds metrics.json; pass a new --workdir or remove it"
        )


def _write_json(workdir: str, name: str, content: dict) -> None:
    """Writes atomically: a temporary file, then a rename."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, name)
    with open(path + ".tmp", "w") as file:
        json.dump(content, file, indent=2)
    os.replace(path + ".tmp", path)
