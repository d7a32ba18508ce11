"""Evaluation after a task: accuracy on every task's test split, gathered over processes."""

import numpy as np

from cljax.run.build import Machinery
from cljax.run.plan import TASK_IL, Plan
from cljax.runtime import Runtime
from cljax.steps import TrainState


def evaluate(
    plan: Plan, machinery: Machinery, runtime: Runtime, feed, state: TrainState
) -> tuple[dict[str, list[float]], list[str]]:
    """Each accuracy of `plan.accuracies` on each task's test split, and the images left out
    as undecodable.

    Per test row: whether the label is the top prediction (`top1`), among the top k
    (`top5`), and (`task_il`) the top prediction among its task's classes. The batches come
    from `feed` (planned after the task's steps), each process's part of each; the
    predictions of all processes are gathered so that every process computes the same
    accuracies.
    """
    test = plan.dataset.test
    batch_size = plan.inputs.eval_batch_size
    predictions, valid, skipped = [], [], []
    for start in range(0, len(test), batch_size):
        count = min(batch_size, len(test) - start)
        host_batch = next(feed)
        skipped.extend(host_batch.pop("skipped").tolist())
        batch = runtime.place(host_batch)
        predicted = machinery.predict(state, batch["inputs"])
        predictions.append([runtime.gather_rows(rows)[:count] for rows in predicted])
        valid.append(runtime.gather_rows(batch["valid"])[:count])
    best, ranked, per_task = (np.concatenate(column) for column in zip(*predictions, strict=True))
    labels = test.labels
    correct = {"top1": best == labels}
    for name in plan.accuracies[1:]:
        if name == TASK_IL:
            own_task = per_task[np.arange(len(labels)), plan.class_tasks[labels]]
            correct[name] = own_task == labels
        else:
            correct[name] = (ranked == labels[:, None]).any(axis=1)
    rows_valid = np.concatenate(valid)
    accuracies = {
        name: [hits[rows][rows_valid[rows]].mean() for rows in plan.scenario.test_rows]
        for name, hits in correct.items()
    }
    return accuracies, skipped
