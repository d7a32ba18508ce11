"""The continual-learning run: `train_and_evaluate(config, workdir)`.

A run in phases, each in its own module of `cljax.run`:
1. check the config (`cljax.checks`) and start the processes and devices (`cljax.runtime`);
2. plan: open the workdir, load the data, build the scenario and the strategy, make every
   check that needs them, derive every value (`plan`); later phases read the plan only;
3. build the model, the optimizer and the jitted steps (`build`);
4. resume from the workdir's latest checkpoint, or start afresh (`resume`);
5. for each task: train (`loop`, with the strategy's end-of-task pass or retraining), evaluate
   (`evaluation`), record the results and save a checkpoint (`results`, `cljax.checkpoint`).
Returns the metrics it writes to `<workdir>/metrics.json`, which always says how the run
stands (`status`).
"""

import contextlib
import time

import ml_collections

from cljax import checkpoint, checks, preemption
from cljax import runtime as runtime_lib
from cljax.data.pipeline import Position
from cljax.errors import CljaxError, ConfigError, Interrupted, Preempted, write_failure
from cljax.run.build import Machinery, build
from cljax.run.clock import Clock
from cljax.run.console import Console, progress_bar
from cljax.run.loop import Session, TaskLoop, begin_task, feed
from cljax.run.plan import Plan, plan
from cljax.run.results import Results
from cljax.run.resume import resume


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
    """Trains on every task in turn and evaluates after each; returns the metrics.

    Without `workdir`, the run gets a new directory under `runs/`.
    """
    wall_start = time.perf_counter()
    checks.validate(config)
    runtime = runtime_lib.create(config.distributed, config.num_cpu_devices)
    with plan(config, runtime, workdir) as run_plan:
        machinery = build(run_plan, runtime)
        return _run_tasks(run_plan, machinery, runtime, wall_start)


def _run_tasks(
    plan: Plan, machinery: Machinery, runtime: runtime_lib.Runtime, wall_start: float
) -> dict:
    """The task loop, from the run's latest checkpoint if it has one; whatever happens,
    metrics.json ends up saying how the run stands."""
    console = Console(runtime, plan.log_dir)
    results = Results(plan, runtime, console, wall_start)
    clock = Clock(plan.task_steps, plan.epochs_per_task)
    checkpoints = checkpoint.Checkpoints(plan.workdir.path, runtime, plan.cadence.checkpoints_kept)
    try:
        state, rehearsal, start = resume(
            plan, machinery, runtime, checkpoints, results, clock, console
        )
    except ConfigError:  # refused (another run's config): the workdir stays as it was
        checkpoints.close()
        raise
    plan.workdir.claim()
    watchdog = runtime.watchdog()
    try:
        results.open_tracker(clock.done_steps(start))
        watchdog.on_stop = lambda line: results.write("failed", line.removeprefix("cljax: "))
        batch = plan.global_batch_size
        with (
            watchdog,
            feed(plan, start) as batches,
            preemption.Preemption(runtime) as preempt,
            progress_bar(
                runtime, clock.total_steps * batch, clock.done_steps(start) * batch
            ) as bar,
        ):
            session = Session(batches, clock, results, checkpoints, watchdog, preempt, console, bar)
            loop = TaskLoop(plan, machinery, runtime, session)
            for task in range(start.task, plan.num_tasks):
                first = start if task == start.task else Position(task)
                if (first.epoch, first.step) == (0, 0):
                    state = begin_task(plan, machinery, state, task)
                clock.begin_task(batches.wait_s)
                state, rehearsal, skipped = loop.train(state, rehearsal, task, first)
                state, rehearsal = loop.task_pass(state, rehearsal, task)
                state, rehearsal = loop.retrain_on_buffer(state, rehearsal, task)
                loop.end_task(task, state, rehearsal, skipped)
            checkpoints.wait()
    except Preempted:
        _stop(checkpoints, results, "preempted")
        raise
    except KeyboardInterrupt:
        _stop(checkpoints, results, "interrupted")
        raise Interrupted(
            f"interrupted; {results.path} holds the {results.completed} finished task(s)"
        ) from None
    except BaseException as error:
        if not isinstance(error, CljaxError):  # not a failure cljax diagnosed itself
            watchdog.stop_if_a_process_was_lost(error)
        failure = write_failure(error, plan.workdir.path)
        message = str(failure or error) or repr(error)
        _stop(None if failure else checkpoints, results, "failed", error=message)
        if failure is not None:
            raise failure from None
        raise
    checkpoints.close()
    model_path = checkpoint.export_model(plan.workdir.path, state, runtime)
    results.write("finished")
    results.close_tracker("finished")
    return results.print_final(model_path)


def _stop(checkpoints: checkpoint.Checkpoints | None, results: Results, status: str, error=None):
    """Ends a run that did not finish: no more checkpoints (those being written are left
    unfinished where `checkpoints` is None: the disk failed), metrics.json says `status` (as
    far as the disk lets it: the error that stopped the run is the one to report)."""
    for finish in (
        checkpoints.close if checkpoints else lambda: None,
        lambda: results.write(status, error=error),
        lambda: results.plot(results.results(status, error)),
        lambda: results.close_tracker(status),
    ):
        with contextlib.suppress(Exception):
            finish()
