"""Runs `cljax.train`'s entry in this process on random plausible-but-wrong configs.

    python tests/fuzz_cli.py DATA_DIR WORK_DIR NUM_CONFIGS SEED

Each config is a tiny digits run (2 devices, 2 tasks, 1 epoch) with 1 to 3 fields set to
values a researcher might plausibly type by mistake (and a few odd but valid ones). Prints
one JSON line per config: its overrides, exit status, stderr's last line and line count,
whether an exception escaped (`traceback`), and for runs that exited 0 whether
metrics.json is standard JSON with finite accuracies.
"""

import contextlib
import io
import json
import math
import os
import signal
import sys
import time
import traceback

import jax

jax.config.update("jax_num_cpu_devices", 2)

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from cljax import train  # noqa: E402

HANG_S = 90
BASE = {
    "num_cpu_devices": "2",
    "epochs_per_task": "1",
    "scenario.num_tasks": "2",
}
# Values as typed on the command line. Distributed set-ups that would try to connect are
# left out: they wait for their peers by design.
VALUES = {
    "seed": ["-1", "1.5", "abc"],
    "num_cpu_devices": ["0", "-2", "3", "1000000"],
    "batch_size": ["0", "-4", "100000", "2.5"],
    "eval_batch_size": ["0", "-1", "1000000"],
    "epochs_per_task": ["0", "-1"],
    "optimizer.learning_rate": ["-1", "1e30", "inf", "nan", "0"],
    "optimizer.name": ["adamw", "SGD", "sgd"],
    "optimizer.momentum": ["1.5", "-0.1"],
    "optimizer.weight_decay": ["-1", "0.5"],
    "optimizer.lr_scaling": ["sqrt", "linear"],
    "optimizer.warmup_epochs": ["-1", "0.5"],
    "optimizer.schedule": ["linear", "step", "cosine"],
    "optimizer.decay_epochs": ["(3,1)", "(1,2)", "3"],
    "optimizer.decay_factors": ["(0.1,)", "(0.1,0.01)"],
    "optimizer.schedule_scope": ["epoch", "stream"],
    "dtype": ["float16", "bf16", "bfloat16"],
    "label_smoothing": ["1.0", "-0.1", "0.1"],
    "dataset.mean": ["(0.5,0.5,0.5)", "(0.5,)", "(nan,)"],
    "dataset.std": ["(0,)", "(2,)"],
    "dataset.name": ["", "digitz", "imagenet2012", "mnist"],
    "dataset.data_dir": ["{work}/a-file/sub"],
    "dataset.image_size": ["0", "-3", "32"],
    "dataset.augment": ["maybe", "true", "crop_flip", "inception"],
    "dataset.prefetch_depth": ["0", "-1", "1000000"],
    "scenario.name": ["domain_incremental", "", "instance_incremental", "joint"],
    "scenario.num_tasks": ["0", "3", "11", "-1", "1000000"],
    "scenario.class_order_seed": ["-5", "3"],
    "scenario.initial_increment": ["0", "11", "-1", "4"],
    "scenario.increment": ["0", "11", "3"],
    "strategy.name": ["ewc", "ER", "derpp", "from_scratch"],
    "strategy.der.alpha": ["-1", "nan", "inf"],
    "strategy.derpp.beta": ["-0.5", "1e40"],
    "buffer.budget_per_class": ["0", "-1", "1000000000", "1"],
    "buffer.rehearsal_ratio": ["0", "101", "-5", "1e-9", "50"],
    "buffer.num_candidates": ["0", "99", "-1"],
    "buffer.num_representatives": ["0", "1000000", "-2", "3"],
    "buffer.policy": ["fifo", "random_replace"],
    "buffer.augment_from_task": ["-1", "99", "1"],
    "buffer.memory_kind": ["pinned_host", "disk", "host"],
    "model.name": ["resnet", "", "cnn"],
    "model.mlp.hidden_sizes": ["()", "(0,)", "(-1,)", "(8", "abc"],
    "model.cnn.channels": ["(0,)", "(-8,)"],
    "model.cnn.dense_size": ["0", "-1"],
    "distributed.backend": ["nccl", "MPI"],
    "distributed.timeout_s": ["0", "-1"],
    "distributed.coordinator_address": ["localhost:1234", "localhost"],
    "distributed.num_processes": ["0", "2"],
    "distributed.process_id": ["5", "-1"],
    "distributed.log_dir": ["{work}/a-file/logs"],
    "batchsize": ["4"],
    "model": ["3"],
}


class Hang(Exception):
    """The run took longer than `HANG_S`."""


def draw(rng: np.random.Generator, work: str) -> dict[str, str]:
    fields = rng.choice(sorted(VALUES), size=rng.integers(1, 4), replace=False)
    return {str(f): str(rng.choice(VALUES[f])).format(work=work) for f in fields}


def metrics_ok(path: str) -> bool:
    """Standard JSON, finished, every accuracy a finite number in [0, 1]."""

    def refuse(token):
        raise ValueError(token)

    try:
        with open(path) as file:
            written = json.load(file, parse_constant=refuse)
    except (OSError, ValueError):
        return False
    rows = written.get("accuracy_matrix") or [[]]
    values = [value for row in rows for value in row]
    return (
        written.get("status") == "finished"
        and bool(values)
        and all(isinstance(v, float | int) and math.isfinite(v) and 0 <= v <= 1 for v in values)
    )


def run_one(overrides: dict[str, str], run_dir: str) -> dict:
    flags.FLAGS.workdir = run_dir
    stderr = io.StringIO()
    status, escaped = 0, None
    start = time.perf_counter()
    signal.alarm(HANG_S)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            train.run(overrides, ["fuzz"])
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    except Hang:
        status, escaped = "hang", "hang"
    except BaseException:  # an escaped exception is what the fuzz looks for
        status, escaped = "traceback", traceback.format_exc()
    finally:
        signal.alarm(0)
    lines = stderr.getvalue().strip().splitlines()
    metrics_path = os.path.join(run_dir, "metrics.json")
    return {
        "overrides": overrides,
        "status": status,
        "last_line": lines[-1] if lines else "",
        "seconds": round(time.perf_counter() - start, 2),
        "escaped": escaped,
        "metrics_ok": metrics_ok(metrics_path) if status == 0 else None,
        "metrics_exists": os.path.exists(metrics_path),
    }


def main() -> None:
    data_dir, work, count, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "a-file"), "w"):
        pass

    def on_alarm(signum, frame):
        raise Hang

    signal.signal(signal.SIGALRM, on_alarm)
    flags.FLAGS(["fuzz", "--config=default"])
    rng = np.random.default_rng(seed)
    for index in range(count):
        overrides = {**BASE, "dataset.data_dir": data_dir, **draw(rng, work)}
        result = run_one(overrides, os.path.join(work, f"run{index}"))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
