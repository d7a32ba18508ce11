"""The strategy base class, what a loss sees, the registry, and the helpers losses share."""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from cljax import components
from cljax.buffer import Representatives
from cljax.collectives import Collectives
from cljax.registry import Registry

STRATEGIES: Registry[type["Strategy"]] = Registry("strategy", "strategy.name")
register = STRATEGIES.register


@dataclasses.dataclass(frozen=True)
class Totals:
    """Sums over all devices of the batch weights and of the representatives' weights."""

    batch: jax.Array
    reps: jax.Array


@dataclasses.dataclass(frozen=True)
class StepOutputs:
    """This device's rows of a training step, as a strategy's loss sees them.

    `logits` and `rep_logits` come from one forward pass over [batch ‖ representatives] with
    the parameters being differentiated; `reps` is None for strategies without a buffer.
    `apply(variables, inputs)` runs the model in evaluation mode (for a teacher's logits)
    on `inputs`, the model's input rows of this step. `task_id` is the task being trained;
    `class_tasks` [C] gives each class's task, for strategies with `needs_task_classes`
    (else None). `params` are the parameters being differentiated (for a penalty on them).
    """

    logits: jax.Array
    labels: jax.Array
    weights: jax.Array
    rep_logits: jax.Array
    reps: Representatives | None
    totals: Totals
    inputs: jax.Array
    apply: Callable[[Any, jax.Array], jax.Array]
    collectives: Collectives
    task_id: jax.Array
    params: Any = None
    class_tasks: jax.Array | None = None
    label_smoothing: float = 0.0

    def cross_entropy(self, logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
        """Weighted sum of the rows' cross-entropies, with the run's label smoothing."""
        return (row_cross_entropies(logits, labels, self.label_smoothing) * weights).sum()

    def batch_and_replay_cross_entropy(self) -> tuple[jax.Array, jax.Array]:
        """`cross_entropy` of the batch rows and of the representatives, from one
        cross-entropy over [batch ‖ representatives]: one pass over the logits, not two."""
        losses = row_cross_entropies(
            jnp.concatenate([self.logits, self.rep_logits]),
            jnp.concatenate([self.labels, self.reps.labels]),
            self.label_smoothing,
        )
        num_new = self.logits.shape[0]
        return (losses[:num_new] * self.weights).sum(), (losses[num_new:] * self.reps.weights).sum()


LossTerms = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TaskRows:
    """What a strategy with `collects_task_rows` sees at a task's end, on one device: its
    rows of the end-of-task pass (`inputs` as stored, `labels`, `valid`: False for padding),
    its buffer, the task, each class's task, the model in evaluation mode (`apply`), the
    inputs' normalisation, and the collectives."""

    inputs: jax.Array
    labels: jax.Array
    valid: jax.Array
    buffer: Any
    task_id: jax.Array
    class_tasks: tuple[int, ...]
    apply: Callable
    normalise: Callable
    collectives: Collectives


def row_cross_entropies(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Each row's softmax cross-entropy, against its label smoothed by `label_smoothing`
    (the target puts 1 - s + s/K on the label, s/K elsewhere)."""
    if label_smoothing == 0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def safe(total: jax.Array) -> jax.Array:
    """A denominator that is never zero."""
    return jnp.maximum(total, 1e-12)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """The base of every strategy: cross-entropy on the new task only, no buffer, no state
    of its own. Subclasses override what they change."""

    uses_buffer: ClassVar[bool] = False
    reinitialise_each_task: ClassVar[bool] = False
    trains_on_seen_tasks: ClassVar[bool] = False
    needs_task_classes: ClassVar[bool] = False
    gradient_terms: ClassVar[tuple[str, ...]] = ()
    needs_task_pass: ClassVar[bool] = False
    collects_task_rows: ClassVar[bool] = False
    buffer_policy: ClassVar[str | None] = None

    @property
    def retraining_epochs(self) -> int:
        """Epochs of a model trained from scratch on the global buffer alone, after each
        task's steps, before its evaluation (GDumb); 0: none."""
        return 0

    @property
    def buffer_draws(self) -> int:
        """Independent draws of r representatives from the buffer per step (the loss sees
        them one after the other in `outputs.reps`)."""
        return 1

    def stored_fields(self, num_classes: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Tensors stored with each sample besides its input."""
        return {}

    def fields_to_store(self, outputs: StepOutputs) -> dict[str, jax.Array]:
        """Values of `stored_fields` for this step's batch rows."""
        return {}

    def init_state(self, variables) -> Any:
        """The strategy's own state for a fresh model (`{"params": ..., **model_state}`),
        replicated on every device."""
        return ()

    def begin_task(self, state: Any, variables, task: int) -> Any:
        """The strategy's state at the start of `task`, given the model's variables. Arrays
        kept from `variables` must be copies (`jnp.copy`): the step donates both."""
        return state

    def task_pass_sums(
        self, state: Any, variables, apply: Callable, inputs: jax.Array, labels, weights
    ) -> Any:
        """One device's sums, over its rows of a batch of the end-of-task pass (`weights`
        0 for padding), of what `end_task` needs; `apply(variables, inputs)` gives the
        model's logits in evaluation mode."""
        raise NotImplementedError(f"{type(self).__name__} does not need a task pass")

    def end_task(self, state: Any, variables, sums: Any, count: jax.Array) -> Any:
        """The strategy's state after the end-of-task pass, from `task_pass_sums` summed
        over every row of the task on every device, and `count`, the number of rows."""
        raise NotImplementedError(f"{type(self).__name__} does not need a task pass")

    def end_task_with_rows(self, state: Any, variables, context: "TaskRows") -> tuple:
        """For a strategy with `collects_task_rows`: its state and this device's buffer
        after the task, from this device's rows of the end-of-task pass (`context`)."""
        raise NotImplementedError(f"{type(self).__name__} does not collect a task's rows")

    def evaluation_logits(self, state: Any, variables, apply: Callable, inputs) -> jax.Array:
        """The scores evaluation ranks the classes by: the model's logits, unless the
        strategy classifies otherwise (iCaRL: by the nearest mean of exemplars)."""
        return apply(variables, inputs)

    def combine_gradients(self, gradients: dict[str, Any]) -> Any:
        """The update's gradient from the gradients of the `gradient_terms` (each summed over
        devices, so the result is the same on every device)."""
        raise NotImplementedError(f"{type(self).__name__} declares no gradient_terms")

    def loss(self, outputs: StepOutputs, state: Any) -> tuple[jax.Array, LossTerms]:
        """This device's part of the loss, and its named terms: the step sums both over
        devices, so a term that is not a sum over this device's rows divided by a global total
        (a regulariser on the parameters, say) must be divided by `num_devices()`."""
        new = outputs.cross_entropy(outputs.logits, outputs.labels, outputs.weights)
        loss = new / safe(outputs.totals.batch)
        return loss, {"new_ce": loss}


def masked(logits: jax.Array, classes: jax.Array) -> jax.Array:
    """`logits` with the columns outside `classes` [C] (bool) out of the softmax: a large
    finite negative, so a padding row whose label is masked still has a finite loss."""
    return jnp.where(classes, logits, MASKED_LOGIT)


MASKED_LOGIT = -1e9


def build(section: Mapping) -> Strategy:
    """The strategy a config's `strategy` section names, with its hyperparameters."""
    name = section["name"]
    return components.build("strategy", name, STRATEGIES[name], section.get(name, {}))
