"""Optimizers and learning-rate schedules from a config's `optimizer` section.

The optimizer is SGD (momentum, optionally Nesterov) or Adam, with weight decay coupled as
in PyTorch's SGD (AdamW's decoupled decay for Adam), optionally sparing BatchNorm scales and
biases. Its learning rate is fed to each step by the host (`optax.inject_hyperparams`), from
a `Schedule`: a pure function of where training stands, in epochs.

The schedule, at epoch e of its scope (a task, or the whole stream of tasks):
- peak = learning_rate x s(D), with s(D) = 1 (`none`), D (`linear`) or min(D, 64) (`paper`,
  the rule of the paper's scripts) for D data-parallel devices;
- warm-up, e < warmup_epochs: from learning_rate up to the peak, linearly (Goyal et al.
  2017; with s(D) = 1 there is nothing to ramp);
- then `constant`; `step`: peak x decay_factors[i] from epoch decay_epochs[i] on (factors of
  the peak, not cumulative, as in the paper's scripts); or `cosine`: from the peak to 0 at
  the end of the scope.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import optax

OPTIMIZERS = ("sgd", "adam")
SCALING_RULES: dict[str, Callable[[int], float]] = {
    "none": lambda devices: 1.0,
    "linear": float,
    "paper": lambda devices: float(min(devices, 64)),
}
SCHEDULES = ("constant", "step", "cosine")
SCOPES = ("task", "stream")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The learning rate as a function of the epoch (fractional) within its scope: a task
    (`scope='task'`) or the whole stream of tasks of `epochs_per_task` epochs each."""

    learning_rate: float
    scale: float = 1.0
    warmup_epochs: float = 0.0
    kind: str = "constant"
    decay_epochs: tuple[float, ...] = ()
    decay_factors: tuple[float, ...] = ()
    total_epochs: float = 1.0
    scope: str = "task"
    epochs_per_task: int = 1

    def at_step(self, task: int, epoch: int, step: int, steps_per_epoch: int) -> float:
        """The rate of training step `step` of epoch `epoch` of `task`."""
        return self(
            scope_epoch(self.scope, task, epoch, step, steps_per_epoch, self.epochs_per_task)
        )

    @property
    def peak(self) -> float:
        return self.learning_rate * self.scale

    def __call__(self, epoch: float) -> float:
        if epoch < self.warmup_epochs:
            return self.learning_rate * (1 + (self.scale - 1) * epoch / self.warmup_epochs)
        if self.kind == "step":
            passed = [
                f for e, f in zip(self.decay_epochs, self.decay_factors, strict=True) if epoch >= e
            ]
            return self.peak * (passed[-1] if passed else 1.0)
        if self.kind == "cosine":
            span = max(self.total_epochs - self.warmup_epochs, 1e-12)
            progress = min(max((epoch - self.warmup_epochs) / span, 0.0), 1.0)
            return self.peak * 0.5 * (1 + math.cos(math.pi * progress))
        return self.peak


def schedule(
    optimizer: Mapping, num_devices: int, epochs_per_task: int, num_tasks: int
) -> Schedule:
    """The schedule of a config's `optimizer` section for a run on `num_devices` devices."""
    scope_tasks = 1 if optimizer.schedule_scope == "task" else num_tasks
    return Schedule(
        learning_rate=optimizer.learning_rate,
        scale=SCALING_RULES[optimizer.lr_scaling](num_devices),
        warmup_epochs=optimizer.warmup_epochs,
        kind=optimizer.schedule,
        decay_epochs=tuple(optimizer.decay_epochs),
        decay_factors=tuple(optimizer.decay_factors),
        total_epochs=epochs_per_task * scope_tasks,
        scope=optimizer.schedule_scope,
        epochs_per_task=epochs_per_task,
    )


def scope_epoch(
    scope: str, task: int, epoch: int, step: int, steps_per_epoch: int, epochs_per_task: int
) -> float:
    """Where a step stands in its schedule, in epochs: within the task, or since the first
    task (`stream`)."""
    within_task = epoch + step / steps_per_epoch
    return within_task if scope == "task" else task * epochs_per_task + within_task


def create(optimizer: Mapping) -> optax.GradientTransformation:
    """The optimizer of a config's `optimizer` section; its learning rate is set each step
    with `with_learning_rate`."""
    decayed = None if optimizer.decay_norm_and_bias else _kernels_only

    def make(learning_rate):
        if optimizer.name == "adam":
            if optimizer.weight_decay == 0:
                return optax.adam(learning_rate)
            return optax.adamw(learning_rate, weight_decay=optimizer.weight_decay, mask=decayed)
        return optax.chain(
            optax.add_decayed_weights(optimizer.weight_decay, mask=decayed),
            optax.sgd(learning_rate, momentum=optimizer.momentum, nesterov=optimizer.nesterov),
        )

    return optax.inject_hyperparams(make)(learning_rate=optimizer.learning_rate)


def with_learning_rate(opt_state, learning_rate: jax.Array):
    """`opt_state` of an optimizer from `create`, set to use `learning_rate` next."""
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": learning_rate})


def _kernels_only(params):
    """Decay weight matrices and kernels; spare biases and BatchNorm scales (ndim 1)."""
    return jax.tree.map(lambda leaf: leaf.ndim > 1, params)
