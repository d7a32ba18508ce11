"""Continual-learning strategies by name: what each trains on, stores and optimises.

A strategy is a frozen dataclass whose fields are its hyperparameters (declared with
`components.argument`: a default, a one-line meaning and a lower bound). Its class
attributes and methods declare the rest:

- `uses_buffer`, `reinitialise_each_task`, `trains_on_seen_tasks`: what the task loop does;
- `stored_fields`: tensors the buffer keeps with each sample besides its input, and
  `fields_to_store`: their values at insertion (DER: the sample's logits);
- `init_state` / `begin_task`: the strategy's own state (a frozen teacher, a gradient
  memory), built from the model's variables, kept in the train state, replicated, and
  handed to `loss` at every step;
- `loss`: the loss of one device's rows, and the named terms it is made of;
- `needs_task_classes`: the loss reads `outputs.class_tasks` (each class's task), so the
  scenario's tasks must have classes of their own;
- `gradient_terms` / `combine_gradients`: a strategy that acts on gradients (A-GEM) names
  the loss terms whose gradients it needs; the step takes each term's gradient, sums it
  over devices, and updates the parameters with what `combine_gradients` makes of them.

Strategies are chosen by `strategy.name` from the registry; `@register(NAME)` adds one, from
cljax or from the user's own code, and its hyperparameters appear in the config as
`strategy.<NAME>.<field>` (register before loading the config).

A loss sees the logits of one forward pass over [batch ‖ representatives]. Each term is a
sum over this device's rows divided by a total over all devices (`Totals`), so that summing
the per-device losses gives the loss of the global batch.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import components
from cljax.buffer import Representatives
from cljax.collectives import Collectives
from cljax.components import argument
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
    (else None).
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


@register("incremental")
@dataclasses.dataclass(frozen=True)
class Incremental(Strategy):
    """Incremental fine-tuning: cross-entropy on the new task only (the lower bound)."""


@register("from_scratch")
@dataclasses.dataclass(frozen=True)
class FromScratch(Strategy):
    """Re-initialise, then train on the union of all tasks so far (the upper bound)."""

    reinitialise_each_task: ClassVar[bool] = True
    trains_on_seen_tasks: ClassVar[bool] = True


@register("er")
@dataclasses.dataclass(frozen=True)
class ER(Strategy):
    """Experience replay: cross-entropy over the concatenation [batch ‖ representatives]."""

    uses_buffer: ClassVar[bool] = True

    def loss(self, outputs: StepOutputs, state: Any) -> tuple[jax.Array, LossTerms]:
        totals = outputs.totals
        new, replayed = outputs.batch_and_replay_cross_entropy()
        total = safe(totals.batch + totals.reps)
        return (new + replayed) / total, {"new_ce": new / total, "replay_ce": replayed / total}


@register("er_ace")
@dataclasses.dataclass(frozen=True)
class ERACE(Strategy):
    """ER with asymmetric cross-entropy (ER-ACE, Caccia et al., ICLR 2022): the new samples'
    cross-entropy sees only the logits of the current task's classes, so learning them does
    not push the old classes' logits down; the representatives' sees every class seen so far.
    Each term is a mean over its own rows (of all devices), as in the paper's code."""

    uses_buffer: ClassVar[bool] = True
    needs_task_classes: ClassVar[bool] = True

    def loss(self, outputs: StepOutputs, state: Any) -> tuple[jax.Array, LossTerms]:
        current = outputs.class_tasks == outputs.task_id
        seen = outputs.class_tasks <= outputs.task_id
        new = outputs.cross_entropy(
            masked(outputs.logits, current), outputs.labels, outputs.weights
        ) / safe(outputs.totals.batch)
        replayed = outputs.cross_entropy(
            masked(outputs.rep_logits, seen), outputs.reps.labels, outputs.reps.weights
        ) / safe(outputs.totals.reps)
        return new + replayed, {"new_ce": new, "replay_ce": replayed}


@register("agem")
@dataclasses.dataclass(frozen=True)
class AGEM(Strategy):
    """Averaged GEM (Chaudhry et al., ICLR 2019): the gradient of the new rows' cross-entropy,
    projected where it would raise the loss on the representatives of earlier tasks: with g
    that gradient and g_ref the representatives', g - (g.g_ref / g_ref.g_ref) g_ref where
    g.g_ref < 0. Both are gradients of the global batch (summed over devices), so every
    device projects alike. The representatives of the task being trained are left out."""

    uses_buffer: ClassVar[bool] = True
    gradient_terms: ClassVar[tuple[str, ...]] = ("new_ce", "reference_ce")

    def loss(self, outputs: StepOutputs, state: Any) -> tuple[jax.Array, LossTerms]:
        reps = outputs.reps
        weights = reps.weights * (reps.task_ids < outputs.task_id)
        total = outputs.collectives.sum(weights.sum())
        new = outputs.cross_entropy(outputs.logits, outputs.labels, outputs.weights)
        new = new / safe(outputs.totals.batch)
        reference = outputs.cross_entropy(outputs.rep_logits, reps.labels, weights) / safe(total)
        return new, {"new_ce": new, "reference_ce": reference}

    def combine_gradients(self, gradients: dict[str, Any]) -> Any:
        new, reference = gradients["new_ce"], gradients["reference_ce"]
        dot, norm = tree_dot(new, reference), tree_dot(reference, reference)
        scale = jnp.where(dot < 0, dot / safe(norm), 0.0)
        return jax.tree.map(lambda g, r: g - scale * r, new, reference)


def tree_dot(a, b) -> jax.Array:
    """The dot product of two pytrees of the same structure, as flat vectors."""
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@register("lwf")
@dataclasses.dataclass(frozen=True)
class LwF(Strategy):
    """Learning without Forgetting (Li & Hoiem, 2016), class-incremental as in the DER
    paper's code: cross-entropy over the classes seen so far, plus alpha times the
    distillation of the old classes' outputs: the cross-entropy, at temperature T, from the
    softmax over the old classes of the model as it was when the task began (the teacher:
    its own state, kept in checkpoints) to that of the model being trained. No buffer."""

    needs_task_classes: ClassVar[bool] = True
    alpha: float = argument(1.0, "weight of the distillation term", minimum=0)
    temperature: float = argument(2.0, "softmax temperature of the distillation", minimum=1e-3)

    def init_state(self, variables) -> Any:
        return jax.tree.map(jnp.copy, variables)

    def begin_task(self, state: Any, variables, task: int) -> Any:
        return jax.tree.map(jnp.copy, variables)

    def loss(self, outputs: StepOutputs, teacher: Any) -> tuple[jax.Array, LossTerms]:
        seen = outputs.class_tasks <= outputs.task_id
        old = outputs.class_tasks < outputs.task_id
        total = safe(outputs.totals.batch)
        new = outputs.cross_entropy(masked(outputs.logits, seen), outputs.labels, outputs.weights)
        batch_inputs = outputs.inputs[: outputs.labels.shape[0]]
        target = jax.lax.stop_gradient(outputs.apply(teacher, batch_inputs))
        rows = optax.softmax_cross_entropy(
            masked(outputs.logits, old) / self.temperature,
            jax.nn.softmax(masked(target.astype(jnp.float32), old) / self.temperature),
        )
        # The first task has no old classes: its distillation term is zero.
        distillation = (rows * outputs.weights).sum() / total * (outputs.task_id > 0)
        new = new / total
        return new + self.alpha * distillation, {"new_ce": new, "distillation": distillation}


def masked(logits: jax.Array, classes: jax.Array) -> jax.Array:
    """`logits` with the columns outside `classes` [C] (bool) out of the softmax: a large
    finite negative, so a padding row whose label is masked still has a finite loss."""
    return jnp.where(classes, logits, MASKED_LOGIT)


MASKED_LOGIT = -1e9


@register("der")
@dataclasses.dataclass(frozen=True)
class DER(Strategy):
    """Dark experience replay: CE(batch) + alpha * MSE(f(x_buf), z_buf), z_buf the logits
    stored with each sample at insertion."""

    uses_buffer: ClassVar[bool] = True
    alpha: float = argument(0.1, "weight of the logit-matching term", minimum=0)

    def stored_fields(self, num_classes: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {"logits": jax.ShapeDtypeStruct((num_classes,), np.dtype(np.float32))}

    def fields_to_store(self, outputs: StepOutputs) -> dict[str, jax.Array]:
        return {"logits": jax.lax.stop_gradient(outputs.logits).astype(jnp.float32)}

    def loss(self, outputs: StepOutputs, state: Any) -> tuple[jax.Array, LossTerms]:
        new = outputs.cross_entropy(outputs.logits, outputs.labels, outputs.weights) / safe(
            outputs.totals.batch
        )
        matching = logit_matching(outputs)
        return new + self.alpha * matching, {"new_ce": new, "logit_mse": matching}


@register("derpp")
@dataclasses.dataclass(frozen=True)
class DERpp(DER):
    """DER++: DER + beta * CE(f(x_buf'), y_buf').

    With `draws=1`, x_buf and x_buf' are one draw: the same r representatives serve both
    terms, which halves the replay traffic. With `draws=2` they are two independent draws of
    r, as in the DER paper (twice the exchange and twice the replayed rows per step).
    """

    beta: float = argument(0.5, "weight of the replayed labels' cross-entropy", minimum=0)
    draws: int = argument(
        1,
        "buffer draws per step: 1 (both replay terms see the same r representatives) or 2"
        " (one independent draw of r per term, as the DER paper)",
        choices=(1, 2),
    )

    @property
    def buffer_draws(self) -> int:
        return self.draws

    def loss(self, outputs: StepOutputs, state: Any) -> tuple[jax.Array, LossTerms]:
        if self.draws == 1:
            new, replayed = outputs.batch_and_replay_cross_entropy()
            new, replayed = new / safe(outputs.totals.batch), replayed / safe(outputs.totals.reps)
            matching = logit_matching(outputs)
        else:
            new = outputs.cross_entropy(outputs.logits, outputs.labels, outputs.weights)
            new = new / safe(outputs.totals.batch)
            reps, logits = _halves(outputs.reps), _halves(outputs.rep_logits)
            totals = outputs.collectives.sum((reps[0].weights.sum(), reps[1].weights.sum()))
            matching = _matching(logits[0], reps[0], totals[0])
            replayed = outputs.cross_entropy(logits[1], reps[1].labels, reps[1].weights)
            replayed = replayed / safe(totals[1])
        loss = new + self.alpha * matching + self.beta * replayed
        return loss, {"new_ce": new, "logit_mse": matching, "replay_ce": replayed}


def logit_matching(outputs: StepOutputs) -> jax.Array:
    """DER's term: the representatives' mean squared distance between their logits now and
    those stored with them, weighted, over the total weight of all devices' representatives."""
    return _matching(outputs.rep_logits, outputs.reps, outputs.totals.reps)


def _matching(rep_logits: jax.Array, reps: Representatives, total: jax.Array) -> jax.Array:
    squared = ((rep_logits - reps.data["logits"]) ** 2).mean(axis=-1)
    return (squared * reps.weights).sum() / safe(total)


def _halves(tree):
    """The two draws a pytree of rows holds, one after the other."""
    rows = jax.tree.leaves(tree)[0].shape[0] // 2
    return jax.tree.map(lambda x: x[:rows], tree), jax.tree.map(lambda x: x[rows:], tree)


def build(section: Mapping) -> Strategy:
    """The strategy a config's `strategy` section names, with its hyperparameters."""
    name = section["name"]
    return components.build("strategy", name, STRATEGIES[name], section.get(name, {}))
