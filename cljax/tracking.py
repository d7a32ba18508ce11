"""Live scalars of a run: TensorBoard event files always, Weights & Biases when asked.

TensorBoard files go to `<workdir>/tensorboard` through tensorboardX, which writes the
event format without TensorFlow. They are written through its `EventsWriter`, in the calling
thread: its `SummaryWriter` hands events to a thread through a queue, and its `flush()`
returns while events still wait there, so a run killed after a checkpoint lost points
logged before it. With `logging.wandb_project`, the same scalars and the
resolved config also go to a W&B run whose files live in `<workdir>/wandb`; a resumed run
continues the same W&B run (its id is kept in `<workdir>/wandb_id`). Only process 0 writes.
"""

import json
import os
import secrets
import time

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.summary import hparams, scalar, text

from cljax import configuration

TENSORBOARD_DIRECTORY = "tensorboard"
WANDB_ID_NAME = "wandb_id"


def hparams_of(resolved_config: dict) -> dict[str, bool | int | float | str]:
    """The config as dotted fields with values TensorBoard's hparams and W&B accept (lists
    and None as their JSON text)."""
    return {
        field: value if isinstance(value, bool | int | float | str) else json.dumps(value)
        for field, value in configuration.flat_fields(resolved_config).items()
    }


class Tracker:
    """Writes scalars at a step of the run to TensorBoard and, if configured, to W&B.

    `first_step` is the step the run starts (or resumes) from: TensorBoard drops what an
    earlier attempt logged after it, so a resumed run has one point per step. Everything
    up to a checkpoint's step is flushed before the checkpoint is taken.
    """

    def __init__(
        self,
        workdir: str,
        logging_config,
        resolved_config: dict,
        summary_metrics: list[str],
        is_main: bool,
        first_step: int,
    ):
        self.is_main = is_main
        self.wandb_run = None
        if not is_main:
            return
        directory = os.path.join(workdir, TENSORBOARD_DIRECTORY)
        fresh = not os.path.isdir(directory)
        os.makedirs(directory, exist_ok=True)
        # A file of its own, even for a second attempt started by this process within the
        # same second (the name holds the time in seconds).
        self.tensorboard = EventsWriter(
            os.path.join(directory, "events"), f".{os.getpid()}.{secrets.token_hex(3)}"
        )
        # TensorBoard drops what earlier attempts logged from this step on.
        self._write(first_step + 1, session_log=SessionLog(status=SessionLog.START))
        flat = hparams_of(resolved_config)
        if fresh:
            for summary in hparams(flat, dict.fromkeys(summary_metrics, 0.0)):
                self._write(0, summary=summary)
            self._write(0, summary=text("config", _as_markdown(flat)))
        if logging_config.wandb_project:
            self.wandb_run = _start_wandb(workdir, logging_config, flat)

    @property
    def wandb_location(self) -> str | None:
        """Where the W&B run can be seen: its URL online, its directory offline."""
        if self.wandb_run is None:
            return None
        return self.wandb_run.url or self.wandb_run.dir

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.is_main:
            return
        for tag, value in values.items():
            self._write(step, summary=scalar(tag, float(value)))
        if self.wandb_run is not None:
            self.wandb_run.log({tag: float(value) for tag, value in values.items()}, step=step)

    def _write(self, step: int, **fields) -> None:
        self.tensorboard.write_event(Event(wall_time=time.time(), step=step, **fields))

    def flush(self) -> None:
        """Hands what was written to the operating system: called with every checkpoint, so
        that a run killed later has on disk every point up to the step it resumes from."""
        if self.is_main:
            self.tensorboard.flush()

    def close(self, status: str) -> None:
        """Flushes everything; a W&B run is marked failed unless `status` is finished, and
        preempted if it was (W&B then expects it to resume)."""
        if not self.is_main:
            return
        self.tensorboard.close()
        if self.wandb_run is not None:
            if status == "preempted":
                self.wandb_run.mark_preempting()
            self.wandb_run.finish(exit_code=0 if status == "finished" else 1)


def _start_wandb(workdir: str, logging_config, flat: dict):
    """A W&B run for this workdir: a new one, or the one an earlier attempt started."""
    import wandb

    id_path = os.path.join(workdir, WANDB_ID_NAME)
    if os.path.exists(id_path):
        with open(id_path) as file:
            run_id = file.read().strip()
    else:
        run_id = secrets.token_hex(4)
        with open(id_path, "w") as file:
            file.write(run_id + "\n")
    return wandb.init(
        project=logging_config.wandb_project,
        entity=logging_config.wandb_entity,
        group=logging_config.wandb_group,
        name=os.path.basename(os.path.abspath(workdir)),
        dir=workdir,
        id=run_id,
        resume="allow",
        mode=logging_config.wandb_mode,
        config=flat,
        settings=wandb.Settings(silent=True),
    )


def _as_markdown(flat: dict) -> str:
    """The config as a two-column markdown table (TensorBoard's text tab renders it)."""
    rows = [f"| {key} | {value} |" for key, value in flat.items()]
    return "\n".join(["| field | value |", "| --- | --- |", *rows])
