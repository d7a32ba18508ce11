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
  over devices, and updates the parameters with what `combine_gradients` makes of them;
- `needs_task_pass` / `task_pass_sums` / `end_task`: a strategy that gathers statistics of
  a task's data once trained on it (online EWC's Fisher) asks for a pass over the task's
  training rows after its steps (evaluation views, `dataset.eval_batch_size` rows at a
  time); `task_pass_sums` gives one device's sums over its rows, the run sums them over
  devices and batches, and `end_task` makes the strategy's next state of them;
- `retraining_epochs`: a strategy that evaluates a model trained from scratch on the buffer
  alone (GDumb) gives its epochs: after each task's steps the run re-initialises the model
  and runs steps without new rows, each replaying r representatives of every device drawn
  from the global buffer, `retraining_epochs` x (samples stored) / (r x D) of them, at the
  optimizer's learning rate decayed to 0 along a cosine;
- `buffer_policy`: the buffer policy the strategy needs (None: any);
- `collects_task_rows` / `end_task_with_rows`: a strategy that chooses what its buffer keeps
  from a whole task (iCaRL's herding) gets each device's rows of the end-of-task pass and
  its buffer, and returns its state and that buffer;
- `evaluation_logits`: the scores evaluation ranks the classes by (iCaRL: nearest mean of
  exemplars), the model's logits by default.

Strategies are chosen by `strategy.name` from the registry; `@register(NAME)` adds one, from
cljax or from the user's own code, and its hyperparameters appear in the config as
`strategy.<NAME>.<field>` (register before loading the config).

A loss sees the logits of one forward pass over [batch ‖ representatives]. Each term is a
sum over this device's rows divided by a total over all devices (`Totals`), so that summing
the per-device losses gives the loss of the global batch.
"""

from cljax.strategies.agem import AGEM, tree_dot
from cljax.strategies.base import (
    MASKED_LOGIT,
    STRATEGIES,
    LossTerms,
    StepOutputs,
    Strategy,
    TaskRows,
    Totals,
    build,
    masked,
    register,
    row_cross_entropies,
    safe,
)
from cljax.strategies.bounds import FromScratch, Incremental
from cljax.strategies.der import DER, DERpp
from cljax.strategies.er import ER, ERACE
from cljax.strategies.ewc import OnlineEWC, chunked_row_sums
from cljax.strategies.gdumb import GDumb
from cljax.strategies.icarl import ICaRL
from cljax.strategies.lwf import LwF

__all__ = [
    "AGEM",
    "DER",
    "ER",
    "ERACE",
    "MASKED_LOGIT",
    "STRATEGIES",
    "DERpp",
    "FromScratch",
    "GDumb",
    "ICaRL",
    "Incremental",
    "LossTerms",
    "LwF",
    "OnlineEWC",
    "StepOutputs",
    "Strategy",
    "TaskRows",
    "Totals",
    "build",
    "chunked_row_sums",
    "masked",
    "register",
    "row_cross_entropies",
    "safe",
    "tree_dot",
]
