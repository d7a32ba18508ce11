"""The continual-learning task loop: `train_and_evaluate(config, workdir)`.

Read top to bottom: check the config, set up devices and data, build the model and the
jitted steps, then for each task train for `epochs_per_task` epochs and evaluate on every
task's test split. Returns the metrics it writes to `<workdir>/metrics.json`.
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
from cljax import configuration, distributed, metrics, steps
from cljax.data import pipeline, scenarios, sources
from cljax.models import create_model
from cljax.strategies import STRATEGIES, LossWeights, Strategy


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains on every task in turn and evaluates after each; returns the metrics."""
    wall_start = time.perf_counter()
    configuration.validate(config)
    _check_workdir(workdir)

    # Processes, devices and data.
    distributed.configure_cpu_devices(
        _cpu_devices_per_process(config), config.distributed.timeout_s
    )
    distributed.initialize(config.distributed)
    mesh = distributed.make_mesh()
    num_devices = distributed.num_data_parallel(mesh)
    configuration.validate_memory_kind(
        config.buffer.memory_kind, [m.kind for m in mesh.devices.flat[0].addressable_memories()]
    )
    if distributed.is_main_process():
        sources.build_if_builtin(config.dataset.name, config.dataset.data_dir)
    distributed.barrier("cljax-dataset-built")
    try:
        dataset = sources.load(
            config.dataset.name, config.dataset.data_dir, config.dataset.image_size
        )
    except sources.DatasetNotPrepared as error:
        raise configuration.ConfigError(str(error)) from error
    configuration.validate_for_data(config, dataset.num_classes, len(dataset.train), num_devices)
    scenario = make_scenario(config, dataset)
    strategy = STRATEGIES[config.strategy.name]
    resolved = _resolved_config(config, dataset, num_devices)
    global_batch_size = config.batch_size * num_devices

    # Model, optimizer and the jitted steps.
    model = create_model(config.model, dataset.num_classes)
    optimizer = optax.adam(config.learning_rate)
    step_config = steps.StepConfig(
        max_value=dataset.max_value,
        strategy=strategy,
        num_candidates=config.buffer.num_candidates,
        num_representatives=config.buffer.num_representatives,
        policy=config.buffer.policy,
        loss_weights=LossWeights(config.strategy.alpha, config.strategy.beta),
        augment_from_task=config.buffer.augment_from_task,
        buffer_memory_kind=config.buffer.memory_kind,
    )
    init_state = _make_init_state(model, optimizer, dataset, mesh)
    train_step = steps.make_train_step(mesh, distributed.collectives(), step_config)
    predict = steps.make_predict(mesh, model.apply, dataset.max_value)
    rehearsal = _init_rehearsal(mesh, resolved, dataset, strategy) if strategy.uses_buffer else None

    # The task loop.
    acc = np.zeros((scenario.num_tasks, scenario.num_tasks))
    state = None
    timings = []
    log = _Logger(config.distributed.log_dir)
    watchdog = distributed.Watchdog(config.distributed.timeout_s)
    if distributed.process_count() > 1:
        watchdog.start()
    run = _Run(config, mesh, dataset, train_step, watchdog, global_batch_size, scenario.num_tasks)
    for task in range(scenario.num_tasks):
        if state is None or strategy.reinitialise_each_task:
            state = init_state(jax.random.fold_in(jax.random.key(config.seed), task))
        train_rows = (
            scenario.train_rows_up_to(task)
            if strategy.trains_on_seen_tasks
            else scenario.train_rows[task]
        )
        task_start = time.perf_counter()
        state, rehearsal, data_wait = _train_task(run, state, rehearsal, train_rows, task)
        eval_start = time.perf_counter()
        correct = _predict_all(predict, state.params, dataset.test, mesh, config) == (
            dataset.test.labels
        )
        acc[task] = [correct[rows].mean() for rows in scenario.test_rows]
        timings.append(
            _with_max_over_processes(
                {
                    "task": task,
                    "train_s": eval_start - task_start,
                    "data_wait_s": data_wait,
                    "eval_s": time.perf_counter() - eval_start,
                }
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
            "num_devices": num_devices,
            "completed_tasks": task + 1,
            "task_timings": timings,
            "config": resolved,
        }
        _write_json(workdir, "metrics.json", results)
        log(
            f"task {task + 1}/{scenario.num_tasks}: accuracy on seen tasks "
            f"{acc[task, : task + 1].mean():.4f}, train time {train_time:.1f}s"
        )

    watchdog.stop()
    log(metrics.format_matrix(acc))
    log(
        f"final_average_accuracy={results['final_average_accuracy']:.4f} "
        f"average_forgetting={results['average_forgetting']:.4f} "
        f"train_time_s={train_time:.1f} metrics: {os.path.join(workdir, 'metrics.json')}"
    )
    return results


class _Logger:
    """Prints on process 0; with `log_dir`, every process also appends to its own file."""

    def __init__(self, log_dir: str | None):
        self.path = None
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self.path = os.path.join(log_dir, f"process_{distributed.process_index()}.log")

    def __call__(self, message: str) -> None:
        if distributed.is_main_process():
            print(message, flush=True)
        if self.path:
            with open(self.path, "a") as file:
                file.write(message + "\n")


def _with_max_over_processes(timing: dict) -> dict:
    """Adds `<key>_max`: the largest value over all processes, for every timing."""
    keys = [key for key in timing if key.endswith("_s")]
    values = distributed.max_over_processes(np.asarray([timing[key] for key in keys]))
    return {**timing, **{f"{key}_max": float(v) for key, v in zip(keys, values, strict=True)}}


@dataclasses.dataclass(frozen=True)
class _Run:
    """What stays the same for every task of a run."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    dataset: sources.Dataset
    train_step: Callable
    watchdog: distributed.Watchdog
    global_batch_size: int
    num_tasks: int


def _train_task(run: _Run, state, rehearsal, rows: np.ndarray, task: int):
    """Runs `epochs_per_task` epochs over `rows`; returns the states and the data wait."""
    config, dataset = run.config, run.dataset
    task_id = jnp.int32(task)
    steps_per_epoch = pipeline.steps_per_epoch(len(rows), run.global_batch_size)
    augment = config.dataset.augment
    batches = pipeline.task_batches(
        dataset.train,
        rows,
        run.global_batch_size,
        seed=config.seed,
        task=task,
        epochs=config.epochs_per_task,
        augment=dataset.natural_images if augment is None else augment,
        process_index=distributed.process_index(),
        process_count=distributed.process_count(),
    )
    progress = tqdm(
        total=config.epochs_per_task * steps_per_epoch,
        desc=f"task {task + 1}/{run.num_tasks}",
        disable=None if distributed.is_main_process() else True,
        leave=False,
    )
    prefetcher = pipeline.Prefetcher(batches, config.dataset.prefetch_depth)
    with progress, prefetcher:
        for step, host_batch in enumerate(prefetcher, start=1):
            batch = pipeline.to_global(host_batch, run.mesh)
            state, rehearsal, step_metrics = run.train_step(state, rehearsal, batch, task_id)
            progress.update()
            run.watchdog.progress()
            if step % steps_per_epoch == 0:
                progress.set_postfix(loss=f"{float(step_metrics['loss']):.3f}")
    jax.block_until_ready((state, rehearsal))
    return state, rehearsal, prefetcher.wait_s


def _cpu_devices_per_process(config: ml_collections.ConfigDict) -> int:
    """Simulated CPU devices of this process: one per process with the MPI backend."""
    return 1 if config.distributed.backend == "mpi" else config.num_cpu_devices


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


def _make_init_state(model, optimizer, dataset, mesh) -> Callable[[jax.Array], steps.TrainState]:
    """`init(key)`: fresh model and optimizer, replicated on every device of every process;
    compiled once, for strategies that re-initialise at every task."""
    sample = steps.normalise(dataset.train.read(np.arange(1)), dataset.max_value)
    return jax.jit(
        lambda key: steps.create_train_state(model, optimizer, sample, key),
        out_shardings=distributed.replicated(mesh),
    )


def buffer_spec(dataset, strategy: Strategy) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """What the buffer stores per sample: the input as stored, and logits for DER."""
    spec = {"inputs": (dataset.input_shape, dataset.input_dtype)}
    if strategy.stores_logits:
        spec["logits"] = ((dataset.num_classes,), np.dtype(np.float32))
    return spec


def _init_rehearsal(mesh, resolved: dict, dataset, strategy: Strategy) -> steps.RehearsalState:
    buffer_config, spec = resolved["buffer"], buffer_spec(dataset, strategy)
    return steps.RehearsalState(
        buffer=buffer_lib.init_sharded(
            mesh,
            buffer_lib.init_buffer,
            dataset.num_classes,
            buffer_config["budget_per_class"],
            spec,
            shardings=buffer_lib.buffer_shardings(mesh, buffer_config["memory_kind"]),
        ),
        representatives=buffer_lib.init_sharded(
            mesh, buffer_lib.init_representatives, buffer_config["num_representatives"], spec
        ),
    )


def _predict_all(predict, params, split, mesh, config) -> np.ndarray:
    """Predicted classes for every row of `split`, in fixed-size sharded batches.

    Each process reads its part of each batch; the predictions of all processes are
    gathered so that every process computes the same accuracies.
    """
    num_devices = distributed.num_data_parallel(mesh)
    batch_size = -(-config.eval_batch_size // num_devices) * num_devices
    predictions = []
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        mine, _ = pipeline.local_rows(
            rows, batch_size, distributed.process_index(), distributed.process_count()
        )
        local = split.read(mine)
        batch = pipeline.to_global({"inputs": local}, mesh)["inputs"]
        predictions.append(distributed.gather_rows(predict(params, batch))[: len(rows)])
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
    """Writes atomically (temporary file, then rename), from process 0 only."""
    if not distributed.is_main_process():
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, name)
    with open(path + ".tmp", "w") as file:
        json.dump(content, file, indent=2)
    os.replace(path + ".tmp", path)
