"""Test tool: `python tests/kill_at.py POINT:N [cljax.train flags...]` runs cljax.train and
SIGKILLs its own process right after the N-th call at POINT has started: `step` (a train
step, or a block of them, dispatched and running on the devices), `eval` (a prediction batch
dispatched), `pass` (a batch of a strategy's end-of-task pass dispatched), `rows` (a
strategy's end of task from the pass's rows dispatched) or `save` (a checkpoint whose write
goes on in the background)."""

import functools
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cljax import checkpoint, steps, train


def killing_after(call_number: int, function):
    """`function`, but the process dies right after its `call_number`-th call returns."""
    calls = 0

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        nonlocal calls
        result = function(*args, **kwargs)
        calls += 1
        if calls == call_number:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return wrapper


def main() -> None:
    point, number = sys.argv.pop(1).split(":")
    number = int(number)
    if point == "step":
        make_one, make_block = steps.make_train_step, steps.make_train_steps
        dispatches = killing_after(number, lambda program, *args: program(*args))
        steps.make_train_step = lambda *args: functools.partial(dispatches, make_one(*args))
        steps.make_train_steps = lambda *args: functools.partial(dispatches, make_block(*args))
    elif point == "eval":
        make = steps.make_predict
        steps.make_predict = lambda *args: killing_after(number, make(*args))
    elif point == "pass":
        make = steps.make_task_pass

        def make_killing(*args):
            batch_sums, finish = make(*args)
            return killing_after(number, batch_sums), finish

        steps.make_task_pass = make_killing
    elif point == "rows":
        make = steps.make_task_rows_end
        steps.make_task_rows_end = lambda *args: killing_after(number, make(*args))
    elif point == "save":
        checkpoint.Checkpoints.save = killing_after(number, checkpoint.Checkpoints.save)
    else:
        raise SystemExit(f"unknown point {point}; use step, eval, pass, rows or save")
    train.main()


if __name__ == "__main__":
    main()
