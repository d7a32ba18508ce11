"""The run's machinery, built from its plan: the model, the optimizer, the jitted steps, and
the functions that make fresh states and describe them for a restore."""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cljax import optim, steps
from cljax.buffer import RehearsalState
from cljax.data import pipeline
from cljax.models import create_model, per_device_batch_norm
from cljax.run.plan import TOP_K, Plan
from cljax.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class Machinery:
    """What stays the same for every task of a run: the steps and the state makers."""

    settings: steps.StepConfig
    # A fresh train state from the run's seed and a stream number (its key: the seed's key
    # folded with the number, in the same program as the state).
    init_state: Callable[[int, int], steps.TrainState]
    reset_optimizer: Callable[[steps.TrainState], steps.TrainState]
    init_rehearsal: Callable[[], RehearsalState | None]
    train_step: Callable
    predict: Callable
    task_pass: tuple[Callable, Callable]
    task_rows_end: Callable

    def abstract_states(self, runtime: Runtime) -> tuple:
        """Shapes, dtypes and shardings (with memory kinds) of the train and rehearsal
        states: what a checkpoint is restored into."""
        state = _placed(jax.eval_shape(self.init_state, 0, 0), runtime.replicated)
        buffer = self.settings.buffer
        if buffer is None:
            return state, None
        rehearsal = jax.eval_shape(self.init_rehearsal)
        return state, _placed(rehearsal, buffer.rehearsal_shardings(runtime.sharded))


def build(plan: Plan, runtime: Runtime) -> Machinery:
    """Model, optimizer and the jitted steps of the run `plan` describes."""
    dataset = plan.dataset
    dtype = jnp.dtype(plan.dtype)
    settings = steps.StepConfig(
        model=create_model(plan.model, dataset.num_classes, dtype, runtime.collectives),
        optimizer=optim.create(plan.optimizer),
        strategy=plan.strategy,
        max_value=dataset.max_value,
        mean=plan.mean,
        std=plan.std,
        dtype=dtype,
        augmentation=plan.inputs.views.augmentation,
        label_smoothing=plan.label_smoothing,
        buffer=plan.buffer,
        augment_from_task=plan.augment_from_task,
        average_model_state=per_device_batch_norm(plan.model),
        class_tasks=None if plan.class_tasks is None else tuple(plan.class_tasks.tolist()),
    )
    sample = pipeline.read_inputs(
        dataset.train, np.arange(1), plan.inputs.views, dataset.input_shape
    )
    init_state = runtime.jit(
        lambda seed, stream: steps.create_train_state(
            settings, sample, jax.random.fold_in(jax.random.key(seed), stream)
        ),
        out_shardings=runtime.replicated,
    )
    reset_optimizer = runtime.jit(
        lambda state: state.replace(opt_state=settings.optimizer.init(state.params)),
        out_shardings=runtime.replicated,
        donate_argnums=0,
    )

    def init_rehearsal() -> RehearsalState | None:
        if plan.buffer is None:
            return None
        return plan.buffer.init_rehearsal(plan.stored, runtime.sharded)

    return Machinery(
        settings=settings,
        init_state=init_state,
        reset_optimizer=reset_optimizer,
        init_rehearsal=init_rehearsal,
        train_step=steps.make_train_step(runtime, settings),
        predict=steps.make_predict(
            runtime, settings, min(TOP_K, dataset.num_classes), plan.class_tasks
        ),
        task_pass=steps.make_task_pass(runtime, settings),
        task_rows_end=steps.make_task_rows_end(runtime, settings),
    )


def _placed(shapes, shardings):
    """`shapes` with the shardings of `shardings`, a prefix of it."""
    return jax.tree.map(
        lambda sharding, subtree: jax.tree.map(
            lambda shape: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
            subtree,
        ),
        shardings,
        shapes,
    )
