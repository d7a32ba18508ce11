"""Training one task: its steps, and between them the checks, checkpoints, preemption and
training scalars; and the feed of host batches the steps (and the evaluations) read."""

import dataclasses
import json
import math
import operator
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
from cljax.run.dispatch import Block, Dispatcher
from cljax.run.evaluation import evaluate
from cljax.run.plan import Plan
from cljax.run.results import Results
from cljax.runtime import Runtime
from cljax.steps import TrainState
from cljax.watchdog import Watchdog


def feed(plan: Plan, start: pipeline.Position) -> prefetch.Prefetcher:
    """Every batch of the run from `start`, in order (each task's steps, the strategy's
    end-of-task pass if it has one, then its evaluation), made by the input pipeline's
    workers and handed over by the prefetch thread."""
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
        inputs.steps_per_item,
        plan.strategy.needs_task_pass,
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
        state = machinery.init_state(plan.seed, task)
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
    of time spent waiting for data since the last point. They are written when a step's
    metrics are read, one block after it was dispatched."""

    def __init__(self, every: int, global_batch_size: int, tracker: tracking.Tracker, feed):
        self.every = every
        self.global_batch_size = global_batch_size
        self.tracker = tracker
        self.feed = feed
        self.since = (0, 0.0, 0.0)

    def restart(self, done: int) -> None:
        """Measures speed from here (after a step that compiled, or an evaluation)."""
        self.since = (done, time.perf_counter(), self.feed.wait_s)

    def due(self, done_before: int, count: int) -> range:
        """The offsets, among `count` steps after `done_before` done, of the steps whose
        scalars are written (the run's step `done_before + offset + 1` a multiple of
        `every`)."""
        first = -(done_before + 1) % self.every
        return range(first, count, self.every)

    def at(self, done: int, step_metrics: dict[str, float], learning_rate: float) -> None:
        """Writes the scalars of the run's step `done` (one that `due` gave)."""
        values = {f"train/{key}": value for key, value in step_metrics.items()}
        steps_done, start, wait_start = self.since
        seconds = time.perf_counter() - start
        values["train/learning_rate"] = learning_rate
        if done > steps_done and seconds > 0:
            values["perf/samples_per_s"] = (done - steps_done) * self.global_batch_size / seconds
            values["perf/data_wait_fraction"] = (self.feed.wait_s - wait_start) / seconds
        self.tracker.scalars(done, values)
        self.restart(done)


class TaskLoop:
    """The training steps of a task, in blocks dispatched together (`Dispatcher`), with the
    checks, checkpoints, preemption checks and training scalars between them."""

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
        self.dispatcher = Dispatcher(machinery, runtime, session.console, plan.steps_per_dispatch)
        self.train_steps = prefetch.TrainSteps(session.feed)
        self.compiled = False
        self.profile = profiling.StepProfile(
            os.path.join(plan.workdir.file("profile"), f"process_{runtime.process_index}"),
            plan.cadence.profile_from_step,
            plan.cadence.profile_steps,
        )

    def train(self, state, rehearsal, task: int, first: pipeline.Position):
        """Runs `task`'s steps from `first`, taking their batches from the feed; returns
        the states and the names of images left out as undecodable.

        Each block's losses are read once the next block is queued (so the check never
        stalls the devices): a non-finite loss stops the run, naming the step where it
        appeared. A checkpoint is only taken of a state whose losses were checked.
        """
        session, clock = self.session, self.session.clock
        steps, steps_per_epoch = clock.task_steps[task], clock.steps_per_epoch(task)
        begin = first.epoch * steps_per_epoch + first.step
        session.bar.set_description(f"task {task + 1}/{len(clock.task_steps)}")
        timed_start = time.perf_counter() if begin == 0 and task == 0 else None
        unchecked, skipped, index = None, [], begin
        if self.compiled:  # speed is measured from the task's start (after its evaluation)
            self.scalars.restart(clock.done_steps(self._position(task, begin)))
        with self.profile:
            while index < steps:
                done_before = clock.done_steps(self._position(task, index))
                count = self._block_length(done_before, steps - index)
                host_batch, left_out = self.train_steps.take(count)
                skipped.extend(left_out)
                rates = np.asarray(
                    [
                        self.plan.schedule.at_step(
                            task, *divmod(step, steps_per_epoch), steps_per_epoch
                        )
                        for step in range(index, index + count)
                    ],
                    np.float32,
                )
                if self.profile.starts_at(done_before):
                    jax.block_until_ready((state, rehearsal))
                    self.profile.start(done_before)
                state, rehearsal, metrics = self.dispatcher.run(
                    state, rehearsal, host_batch, task, rates, single=self.profile.active
                )
                if unchecked is not None:
                    self._check(unchecked, task)
                unchecked = Block(index, count, metrics, rates)
                index += count
                session.bar.update(count * self.plan.global_batch_size)
                session.watchdog.progress()
                after = self._position(task, index)
                done = clock.done_steps(after)
                if not self.compiled:  # speed leaves out the first call, which compiled
                    self.scalars.restart(done)
                    self.compiled = True
                if timed_start is not None and index == count:
                    jax.block_until_ready(metrics)
                    seconds = time.perf_counter() - timed_start
                    what = "first train step" if count == 1 else f"first {count} train steps"
                    session.console(f"{what} done in {seconds:.1f}s (compilation included)")
                if self.profile.ends_at(done, task_ends=index == steps):
                    self._finish_profile(done, state, rehearsal)
                stop = session.preempt.requested(done)
                every = self.plan.cadence.checkpoint_every_steps
                if index < steps and (stop or (every and done % every == 0)):
                    self._check(unchecked, task)
                    unchecked = None
                    self._save(done, state, rehearsal, after)
                if stop:
                    raise Preempted(preempted_message(session.preempt, session.results, after))
        if unchecked is not None:
            self._check(unchecked, task)
        jax.block_until_ready((state, rehearsal))
        return state, rehearsal, skipped

    def _position(self, task: int, index: int) -> pipeline.Position:
        """Where the task's step `index` stands: (task, epoch, step of the epoch)."""
        return pipeline.Position(task, *divmod(index, self.session.clock.steps_per_epoch(task)))

    def _block_length(self, done_before: int, left: int) -> int:
        """The next block's steps: up to K, ending at the task's end, at every checkpoint
        step, and around the profiled steps (traced one per dispatch)."""
        every = self.plan.cadence.checkpoint_every_steps
        boundary = every - done_before % every if every else left
        profile = self.profile
        if profile.first is not None and profile.traced_from is None:
            if done_before >= profile.first:
                return 1
            boundary = min(boundary, profile.first - done_before)
        if profile.active:
            return 1
        return self.dispatcher.block_length(left, boundary)

    def _check(self, block: Block, task: int) -> None:
        """Reads a block's metrics: raises `RunFailed` at the first step whose loss is not
        finite; writes the training scalars of its steps; shows the loss at an epoch's end.
        Whole-block array operations: a per-step loop of Python took 10 us a step."""
        clock, values = self.session.clock, block.read()
        losses = values["loss"]
        not_finite = np.flatnonzero(~np.isfinite(losses))
        checked = int(not_finite[0]) if not_finite.size else block.count  # steps before it
        done_before = clock.done_steps(self._position(task, block.first))
        for offset in self.scalars.due(done_before, checked):
            step_values = {name: float(value[offset]) for name, value in values.items()}
            learning_rate = float(block.learning_rates[offset])
            self.scalars.at(done_before + offset + 1, step_values, learning_rate)
        ends = block.first + np.arange(1, checked + 1)
        epoch_ends = np.flatnonzero(ends % clock.steps_per_epoch(task) == 0)
        if epoch_ends.size:
            self.session.bar.set_postfix(loss=f"{float(losses[epoch_ends[-1]]):.3f}")
        if not_finite.size:
            self._fail(float(losses[checked]), block.first + checked, task)

    def task_pass(self, state: TrainState, rehearsal, task: int) -> tuple:
        """The states after the strategy's end-of-task pass over `task`'s rows (unchanged
        for a strategy without one); its batches come next in the feed. Its images were
        decoded for training already: one left out there is left out here too, unreported.
        A strategy that `collects_task_rows` gets every batch's rows, and the buffer."""
        strategy = self.plan.strategy
        if not strategy.needs_task_pass:
            return state, rehearsal
        batch_sums, finish = self.machinery.task_pass
        batch_size, totals, batches = self.plan.inputs.eval_batch_size, None, []
        for _ in range(0, len(self.plan.task_rows[task]), batch_size):
            host_batch = next(self.session.feed)
            host_batch.pop("skipped")
            batch = self.runtime.place(host_batch)
            self.session.watchdog.progress()
            if strategy.collects_task_rows:
                batches.append(batch)
                continue
            sums = batch_sums(state, batch["inputs"], batch["labels"], batch["valid"])
            totals = sums if totals is None else jax.tree.map(operator.add, totals, sums)
        if strategy.collects_task_rows:
            rows = [[batch[name] for batch in batches] for name in ("inputs", "labels", "valid")]
            task_id = self.runtime.replicate(np.int32(task))
            state, rehearsal = self.machinery.task_rows_end(state, rehearsal, *rows, task_id)
        else:
            state = finish(state, *totals)
        # The pass is the strategy's training work: its time counts as the task's training.
        return jax.block_until_ready((state, rehearsal))

    def retrain_on_buffer(self, state: TrainState, rehearsal, task: int) -> tuple:
        """For a strategy with `retraining_epochs` (GDumb): a model trained from scratch on
        the global buffer alone, in steps without new rows, `retraining_epochs` x (samples
        stored) / (r x D) of them, at the optimizer's learning rate decayed to 0 along a
        cosine; else the states as they are. A loss that is not finite stops the run."""
        epochs = self.plan.strategy.retraining_epochs
        if not epochs:
            return state, rehearsal
        plan, runtime = self.plan, self.runtime
        stored = int(runtime.gather_rows(rehearsal.buffer.counts).sum())
        drawn = plan.buffer.num_representatives * runtime.num_devices
        steps = math.ceil(epochs * stored / drawn)
        rates = plan.optimizer.learning_rate * 0.5 * (1 + np.cos(np.pi * np.arange(steps) / steps))
        state, blocks, index = self.machinery.init_state(plan.seed, plan.num_tasks + task), [], 0
        while index < steps:
            count = self.dispatcher.block_length(steps - index, steps - index)
            block_rates = rates[index : index + count].astype(np.float32)
            empty = self._rows_without_samples(count)
            state, rehearsal, metrics = self.dispatcher.run(
                state, rehearsal, empty, task, block_rates
            )
            blocks.append(Block(index, count, metrics, block_rates))
            index += count
            self.session.watchdog.progress()
        for block in blocks:
            losses = block.read()["loss"]
            if not np.isfinite(losses).all():
                raise RunFailed(
                    f"the loss became {losses[~np.isfinite(losses)][0]} while retraining on"
                    f" the buffer after task {task + 1}; lower"
                    f" --config.optimizer.learning_rate (now {plan.optimizer.learning_rate:g})"
                )
        return state, rehearsal

    def _rows_without_samples(self, count: int) -> dict[str, np.ndarray]:
        """`count` steps' batches of this process's rows, every row padding."""
        dataset = self.plan.dataset
        rows = (count, self.plan.global_batch_size // self.runtime.process_count)
        return {
            "inputs": np.zeros((*rows, *dataset.input_shape), dataset.input_dtype),
            "labels": np.zeros(rows, dataset.train.labels.dtype),
            "mask": np.zeros(rows, bool),
        }

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

    def _finish_profile(self, done: int, state, rehearsal) -> None:
        """Ends the profile once the traced steps have run; the step's HLO text comes from
        the compiled step already in memory."""
        jax.block_until_ready((state, rehearsal))
        folder, summary = self.profile.finish(
            done, lambda: self.dispatcher.program_text(state, rehearsal)
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

    def _fail(self, loss: float, index: int, task: int) -> None:
        """Stops the run at the task's step `index`, whose loss was not finite."""
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
