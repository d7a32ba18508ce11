"""Training one task: its steps, and between them the checks, checkpoints, preemption and
training scalars; and the feed of host batches the steps (and the evaluations) read."""

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from cljax import checkpoint, preemption, profiling, tracking
from cljax.data import pipeline, prefetch
from cljax.errors import Preempted, RunFailed
from cljax.run.build import Machinery
from cljax.run.clock import Clock
from cljax.run.console import Console
from cljax.run.evaluation import evaluate
from cljax.run.plan import Plan
from cljax.run.results import Results
from cljax.runtime import Runtime
from cljax.steps import TrainState
from cljax.watchdog import Watchdog


def feed(plan: Plan, start: pipeline.Position) -> prefetch.Prefetcher:
    """Every batch of the run from `start`, in order (each task's steps, then its
    evaluation), made by the input pipeline's workers and handed over by the prefetch
    thread."""
    inputs, dataset = plan.inputs, plan.dataset
    loader = pipeline.Loader(
        train=dataset.train,
        test=dataset.test,
        task_rows=plan.task_rows,
        layout=inputs.layout,
        views=inputs.views,
        input_shape=dataset.input_shape,
        seed=plan.seed,
        eval_batch_size=inputs.eval_batch_size,
        bad_images=inputs.bad_images,
    )
    items = pipeline.plan(
        plan.task_rows,
        len(dataset.test),
        plan.epochs_per_task,
        plan.global_batch_size,
        inputs.eval_batch_size,
        start,
    )
    return prefetch.Prefetcher(
        pipeline.batches(loader, items, inputs.worker_count, inputs.workers),
        inputs.prefetch_depth,
    )


def begin_task(plan: Plan, machinery: Machinery, state: TrainState | None, task: int):
    """The state a task starts from: fresh (the first task, or every task of a strategy
    that re-initialises; from `init_from` if set), else the last one with the optimizer
    reset if configured; then the strategy's own start of task."""
    if state is None or plan.strategy.reinitialise_each_task:
        state = machinery.init_state(jax.random.fold_in(jax.random.key(plan.seed), task))
        if plan.init_from:
            state = checkpoint.load_model(plan.init_from, state)
    elif plan.optimizer.reset_each_task:
        state = machinery.reset_optimizer(state)
    return state.replace(
        strategy_state=plan.strategy.begin_task(state.strategy_state, state.variables, task)
    )


def preempted_message(preempt: preemption.Preemption, results: Results, position) -> str:
    return (
        f"{preempt.name}: saved a checkpoint at task {position.task + 1}, epoch"
        f" {position.epoch + 1}, step {position.step + 1}; run the same command to resume"
        f" ({results.path} says preempted)"
    )


class StepScalars:
    """The training scalars, every `log_every_steps` steps of the run: the loss and its
    terms, the representatives' weight, the learning rate, and the samples/s and fraction
    of time spent waiting for data since the last point."""

    def __init__(self, every: int, global_batch_size: int, tracker: tracking.Tracker, feed):
        self.every = every
        self.global_batch_size = global_batch_size
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


class Replicated:
    """One step argument's host value on every device, copied there again only when it
    changes: the task id once per task, a learning rate once for as long as it stays the
    same (see `Runtime.replicate`)."""

    def __init__(self, runtime: Runtime, dtype: type[np.generic]):
        self.runtime = runtime
        self.dtype = dtype
        self.value, self.placed = None, None

    def __call__(self, value: float) -> jax.Array:
        value = self.dtype(value)
        if value != self.value:
            self.value, self.placed = value, self.runtime.replicate(value)
        return self.placed


class TaskLoop:
    """The training steps of a task, with the checkpoints, the preemption checks and the
    training scalars between them."""

    def __init__(self, plan: Plan, machinery: Machinery, runtime: Runtime, session: "Session"):
        self.plan = plan
        self.machinery = machinery
        self.runtime = runtime
        self.session = session
        self.scalars = StepScalars(
            plan.cadence.log_every_steps,
            plan.global_batch_size,
            session.results.tracker,
            session.feed,
        )
        self.task_id = Replicated(runtime, np.int32)
        self.learning_rate = Replicated(runtime, np.float32)
        self.profile = profiling.StepProfile(
            os.path.join(plan.workdir.file("profile"), f"process_{runtime.process_index}"),
            plan.cadence.profile_from_step,
            plan.cadence.profile_steps,
        )

    def train(self, state, rehearsal, task: int, first: pipeline.Position):
        """Runs `task`'s steps from `first`, taking their batches from the feed; returns
        the states and the names of images left out as undecodable.

        Each step's loss is checked once the next step is queued (so the check never
        stalls the device): a non-finite loss stops the run, naming where it happened. A
        checkpoint is only taken of a state whose loss was checked.
        """
        plan, session, clock = self.plan, self.session, self.session.clock
        task_id = self.task_id(task)
        steps, steps_per_epoch = clock.task_steps[task], clock.steps_per_epoch(task)
        begin = first.epoch * steps_per_epoch + first.step
        session.bar.set_description(f"task {task + 1}/{len(clock.task_steps)}")
        timed_start = time.perf_counter() if begin == 0 and task == 0 else None
        unchecked, skipped = None, []
        with self.profile:
            for index in range(begin, steps):
                host_batch = next(session.feed)
                skipped.extend(host_batch.pop("skipped").tolist())
                batch = self.runtime.place(host_batch)
                epoch, step = divmod(index, steps_per_epoch)
                learning_rate = plan.schedule.at_step(task, epoch, step, steps_per_epoch)
                done_before = clock.done_steps(pipeline.Position(task, epoch, step))
                if self.profile.starts_at(done_before):
                    jax.block_until_ready((state, rehearsal))
                    self.profile.start(done_before)
                step_args = (batch, task_id, self.learning_rate(learning_rate))
                state, rehearsal, step_metrics = self.machinery.train_step(
                    state, rehearsal, *step_args
                )
                if unchecked is not None:
                    self._check_finite(*unchecked, task)
                unchecked = (step_metrics, index)
                session.bar.update(plan.global_batch_size)
                session.watchdog.progress()
                after = pipeline.Position(task, *divmod(index + 1, steps_per_epoch))
                done = clock.done_steps(after)
                if index == begin:
                    self.scalars.restart(done)
                if timed_start is not None and index == 0:
                    jax.block_until_ready(step_metrics)
                    seconds = time.perf_counter() - timed_start
                    session.console(
                        f"first train step done in {seconds:.1f}s (compilation included)"
                    )
                if (index + 1) % steps_per_epoch == 0:
                    session.bar.set_postfix(loss=f"{float(step_metrics['loss']):.3f}")
                self.scalars.at(done, step_metrics, float(learning_rate))
                if self.profile.ends_at(done, task_ends=index + 1 == steps):
                    self._finish_profile(done, (state, rehearsal, *step_args))
                stop = session.preempt.requested(done)
                every = plan.cadence.checkpoint_every_steps
                if index + 1 < steps and (stop or (every and done % every == 0)):
                    self._check_finite(*unchecked, task)
                    unchecked = None
                    self._save(done, state, rehearsal, after)
                if stop:
                    raise Preempted(preempted_message(session.preempt, session.results, after))
        if unchecked is not None:
            self._check_finite(*unchecked, task)
        jax.block_until_ready((state, rehearsal))
        return state, rehearsal, skipped

    def end_task(self, task: int, state, rehearsal, skipped: list[str]) -> None:
        """After `task`'s training: its evaluation, results and end-of-task checkpoint; stops
        the run if a preemption was asked for and tasks remain."""
        session, runtime = self.session, self.runtime
        clock, results, watchdog = session.clock, session.results, session.watchdog
        eval_start, eval_wait = time.perf_counter(), session.feed.wait_s
        accuracies, eval_skipped = evaluate(self.plan, self.machinery, runtime, session.feed, state)
        watchdog.progress()
        results.skipped(runtime.all_texts(json.dumps([*skipped, *eval_skipped])))
        next_task = pipeline.Position(task + 1)
        done = clock.done_steps(next_task)
        results.add_task(accuracies, clock.end_task(task, eval_start, eval_wait), done)
        save_start = time.perf_counter()
        session.checkpoints.save(done, state, rehearsal, next_task, results.progress())
        watchdog.progress()
        results.publish(task, time.perf_counter() - save_start)
        watchdog.progress()
        if task + 1 < self.plan.num_tasks and session.preempt.requested():
            raise Preempted(preempted_message(session.preempt, results, next_task))

    def _finish_profile(self, done: int, step_args: tuple) -> None:
        """Ends the profile once the traced steps have run; the step's HLO text comes from
        the compiled step already in memory."""
        jax.block_until_ready(step_args)
        folder, summary = self.profile.finish(
            done, lambda: self.machinery.train_step.lower(*step_args).compile().as_text()
        )
        self.session.console(
            f"profiled {summary['steps']} steps: {folder} (summary.json, TensorBoard)"
        )

    def _save(self, done: int, state, rehearsal, position: pipeline.Position) -> None:
        session = self.session
        elapsed = session.clock.elapsed(session.feed.wait_s)
        session.results.tracker.flush()
        start = time.perf_counter()
        session.checkpoints.save(
            done, state, rehearsal, position, session.results.progress(task_elapsed=elapsed)
        )
        session.clock.add_checkpoint_time(time.perf_counter() - start)

    def _check_finite(self, step_metrics: dict, index: int, task: int) -> None:
        """Raises `RunFailed` if the loss of the step at `index` (within the task) is not
        finite."""
        loss = float(step_metrics["loss"])
        if math.isfinite(loss):
            return
        clock = self.session.clock
        steps_per_epoch = clock.steps_per_epoch(task)
        epoch, step = divmod(index, steps_per_epoch)
        raise RunFailed(
            f"the loss became {loss} at task {task + 1}/{len(clock.task_steps)}, epoch"
            f" {epoch + 1}/{self.plan.epochs_per_task}, step {step + 1}/{steps_per_epoch};"
            f" lower --config.optimizer.learning_rate (now"
            f" {self.plan.optimizer.learning_rate:g}) or check the data"
        )


@dataclasses.dataclass(frozen=True)
class Session:
    """What the task loop shares while it runs: the feed of host batches, the clock, the
    results, the checkpoints, the watchdog, the preemption handler, the console and the
    progress bar."""

    feed: prefetch.Prefetcher
    clock: Clock
    results: Results
    checkpoints: checkpoint.Checkpoints
    watchdog: Watchdog
    preempt: preemption.Preemption
    console: Console
    bar: tqdm
