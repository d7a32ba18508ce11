"""cljax's train step on random device-resident batches, for the step-time benchmarks.

`start(devices)` starts JAX as a training run does, before anything else of JAX runs;
`build(Case(...))` returns a `Bench` holding the jitted step, its states and a batch already
on the devices: `compile()`, then `timed_steps(count)` runs `count` steps as the trainer
runs them and returns their seconds per step.
"""

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cljax import buffer as buffer_lib
from cljax import configuration, optim, steps
from cljax import runtime as runtime_lib
from cljax.data import sources
from cljax.models import create_model, per_device_batch_norm
from cljax.strategies import STRATEGIES


@dataclasses.dataclass(frozen=True)
class Case:
    """A step to time: the model, the per-device batch and the strategy."""

    model: str = "resnet50"
    model_args: dict = dataclasses.field(default_factory=dict)
    image_size: int = 224
    num_classes: int = 1000
    batch_size: int = 56
    strategy: str = "incremental"
    num_candidates: int = 14
    num_representatives: int = 7
    buffer_per_class: int = 2
    dtype: str = "bfloat16"
    channels: int = 3
    batch_norm: str = "global"

    @property
    def uses_buffer(self) -> bool:
        return STRATEGIES[self.strategy].uses_buffer

    @property
    def augmentation(self) -> str:
        if self.channels != 3:
            return "none"
        return "inception" if self.image_size > 64 else "crop_flip"

    def summary(self) -> dict:
        summary = {
            "model": self.model,
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "strategy": self.strategy,
            "dtype": self.dtype,
            "batch_norm": self.batch_norm,
        }
        if self.uses_buffer:
            summary.update(c=self.num_candidates, r=self.num_representatives)
        return summary


class Bench:
    """A compiled step and what it is fed."""

    def __init__(self, step, state, rehearsal, batch, runtime):
        self.step, self.state, self.rehearsal, self.batch = step, state, rehearsal, batch
        self.runtime = runtime
        self.compiled = None
        # Placed once, as the trainer places them (Runtime.replicate).
        self.task_id = runtime.replicate(np.int32(1))
        self.learning_rate = runtime.replicate(np.float32(0.1))

    def compile(self) -> None:
        args = (self.state, self.rehearsal, self.batch, self.task_id, self.learning_rate)
        self.compiled = self.step.lower(*args).compile()

    def run(self, count: int) -> None:
        """`count` steps at the trainer's cadence: each step's metrics are waited for once
        the next step is queued (so the host dispatches step n + 1 while the devices run
        step n), and the last step's states at the end."""
        queued = None
        for _ in range(count):
            self.state, self.rehearsal, metrics = self.compiled(
                self.state, self.rehearsal, self.batch, self.task_id, self.learning_rate
            )
            if queued is not None:
                jax.block_until_ready(queued)
            queued = metrics
        jax.block_until_ready((self.state, self.rehearsal, metrics))

    def timed_steps(self, count: int = 1) -> float:
        """Seconds per step of `run(count)`; with count = 1, one step's full latency."""
        start = time.perf_counter()
        self.run(count)
        return (time.perf_counter() - start) / count

    def peak_memory_gib(self) -> float | None:
        stats = self.runtime.mesh.local_devices[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return None if peak is None else round(peak / 2**30, 2)


def start(devices: int) -> runtime_lib.JaxRuntime:
    """Starts JAX for a benchmark on `devices` devices in all: on a CPU, that many simulated
    devices split evenly over the processes a launcher started (`srun`, `mpirun`), which
    join by jax.distributed as in training; on GPUs, the first `devices` of them, or, in a
    job of several processes, all of every process."""
    processes = runtime_lib.launched_processes()[0]
    if devices < 1 or devices % processes:
        raise SystemExit(
            f"--devices={devices} cannot be split evenly over the {processes} processes the"
            f" launcher started; use a multiple of {processes}"
        )
    config = configuration.load_config()
    config.num_cpu_devices, config.distributed.timeout_s = devices, 600
    runtime = runtime_lib.JaxRuntime.start(config.distributed, config.num_cpu_devices)
    available = len(jax.devices())
    if devices > available or (runtime.process_count > 1 and devices != available):
        raise SystemExit(
            f"--devices={devices} does not fit this job's {available} devices"
            f" ({runtime.process_count} processes); use {available}"
            + (" or fewer" if runtime.process_count == 1 else "")
        )
    return runtime


def _paper_optimizer() -> ml_collections.ConfigDict:
    """The paper's optimizer section: SGD with momentum 0.9 and weight decay 5e-5."""
    return ml_collections.ConfigDict(
        {
            "name": "sgd",
            "learning_rate": 0.1,
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": 5e-5,
            "decay_norm_and_bias": True,
        }
    )


def build(case: Case, devices: int | None = None) -> Bench:
    """The step of `case` on the first `devices` devices (all by default; all of every
    process in a job of several)."""
    runtime = runtime_lib.JaxRuntime(timeout_s=600)
    if devices is not None:
        runtime.mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:devices]), ("data",))
    dtype = jnp.dtype(case.dtype)
    model_config = ml_collections.ConfigDict(
        {"name": case.model, case.model: dict(case.model_args), "batch_norm": case.batch_norm}
    )
    shape = (case.image_size, case.image_size, case.channels)
    buffer = None
    if case.uses_buffer:
        buffer = buffer_lib.rehearsal_buffer(
            case.num_classes, case.buffer_per_class, case.num_candidates, case.num_representatives
        )
    mean, std = sources.IMAGENET_STATISTICS if case.channels == 3 else ((0.0,), (1.0,))
    strategy = STRATEGIES[case.strategy]()
    settings = steps.StepConfig(
        model=create_model(model_config, case.num_classes, dtype, runtime.collectives),
        optimizer=optim.create(_paper_optimizer()),
        strategy=strategy,
        max_value=255.0,
        mean=mean,
        std=std,
        dtype=dtype,
        augmentation=case.augmentation,
        buffer=buffer,
        average_model_state=per_device_batch_norm(model_config),
    )
    sample = jnp.zeros((1, *shape), jnp.uint8)
    state = jax.jit(
        lambda key: steps.create_train_state(settings, sample, key),
        out_shardings=runtime.replicated,
    )(jax.random.key(0))
    rehearsal = None
    if buffer is not None:
        example = {
            "inputs": jax.ShapeDtypeStruct(shape, np.dtype(np.uint8)),
            **strategy.stored_fields(case.num_classes),
        }
        rehearsal = buffer_lib.RehearsalState(
            buffer.init_sharded(example, runtime.sharded),
            buffer.empty_representatives_sharded(example, runtime.sharded),
        )
    local_devices = len(runtime.mesh.local_devices)
    batch = runtime.place(_host_batch(case, local_devices, shape, buffer is not None))
    bench = Bench(steps.make_train_step(runtime, settings), state, rehearsal, batch, runtime)
    return bench


def _host_batch(case: Case, num_devices: int, shape, with_candidates: bool) -> dict[str, Any]:
    """This process's rows of a batch: `batch_size` per device of `num_devices`."""
    rng = np.random.default_rng(0)
    rows = case.batch_size * num_devices
    batch = {
        "inputs": rng.integers(0, 256, (rows, *shape), dtype=np.uint8),
        "labels": rng.integers(0, case.num_classes, rows).astype(np.int32),
        "mask": np.ones(rows, bool),
    }
    if with_candidates and case.augmentation == "inception":
        picks = case.num_candidates * num_devices
        batch["candidate_rows"] = np.tile(np.arange(case.num_candidates), num_devices).astype(
            np.int32
        )
        batch["candidate_inputs"] = rng.integers(0, 256, (picks, *shape), dtype=np.uint8)
    return batch
