"""Where a run starts: from the latest readable checkpoint of its workdir, or afresh."""

import dataclasses

from cljax import checkpoint
from cljax.data import pipeline
from cljax.run.build import Machinery
from cljax.run.clock import Clock
from cljax.run.console import Console
from cljax.run.plan import Plan
from cljax.run.results import Results
from cljax.runtime import Runtime


def resume(
    plan: Plan,
    machinery: Machinery,
    runtime: Runtime,
    checkpoints: checkpoint.Checkpoints,
    results: Results,
    clock: Clock,
    console: Console,
):
    """(state, rehearsal, position) to start from: the latest checkpoint's, after checking
    that this run's config is the checkpointed one's, with `results` and `clock` as they
    stood; else a fresh start (state None, an empty buffer)."""
    devices = runtime.num_devices
    earlier = plan.workdir.earlier_metrics()

    def check(progress: dict) -> None:
        checkpoint.check_same_config(
            progress["config"],
            plan.resolved_config,
            progress["num_devices"] == devices,
            plan.workdir.path,
        )

    restored = checkpoints.restore_latest(lambda: machinery.abstract_states(runtime), check)
    if restored is None:
        if earlier is not None and "config" in earlier:
            check({"config": earlier["config"], "num_devices": earlier["num_devices"]})
        return None, machinery.init_rehearsal(), pipeline.Position()
    results.load(restored.progress)
    clock.load(restored.progress)
    position = restored.position
    saved_devices = restored.progress["num_devices"]
    if saved_devices != devices:
        samples = position.step * restored.progress["global_batch_size"]
        position = dataclasses.replace(position, step=samples // plan.global_batch_size)
    console(
        f"resuming from {checkpoints.path}/{restored.step}: task {position.task + 1}, epoch"
        f" {position.epoch + 1}, step {position.step + 1}"
        + (
            f" (saved on {saved_devices} devices, now {devices})"
            if saved_devices != devices
            else ""
        )
    )
    return restored.state, restored.rehearsal, position
