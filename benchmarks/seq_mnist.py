"""Split MNIST, the DER paper's Seq-MNIST protocol (configs/mnist_der.py): accuracy over seeds
next to the paper's table, and speed side by side with Avalanche.

    python benchmarks/seq_mnist.py --from_dir=../shared/data/mnist [--seeds 0 1 2 3 4]
        [--cells sgd joint er-200 ...] [--out DIR]
    python benchmarks/seq_mnist.py --speed --from_dir=../shared/data/mnist [--runs 3]
        [--avalanche_venv DIR]

The grid runs every cell (`mnist_der:CELL`) for every seed, each as `python -m cljax.train`,
and prints one JSON line per run and a table of class-IL and task-IL accuracy (mean ± sample
standard deviation over the seeds) beside the DER paper's means (its Table 2: class-IL of
every cell it has, task-IL where the issue that set the bars quotes it; ER-ACE is not in it).

`--speed` runs the ER protocol with a buffer of 500 (batch 10, replay minibatch 10, one epoch
per task) in cljax and in Avalanche 0.6 (`benchmarks/avalanche_er.py`, in a virtualenv of
its own: made at `--avalanche_venv` with torch, torchvision and avalanche-lib from the
package index unless it exists; cljax never imports it), `--runs` times each, interleaved
and alternating which goes first. It prints new training images/s and the whole run's time
(training and the five evaluations, in the process; and the process from start to exit), the
medians over the runs, and the fraction of this CPU's dense matrix-product rate (measured
here with JAX) that cljax's training reaches on the MLP's arithmetic, and the time the same
training arithmetic takes written in plain JAX (the MLP's SGD step at 20 rows scanned over
device-resident batches, no buffer, no cljax): what is left of cljax's training time once the
arithmetic is paid.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CELLS = [
    "sgd",
    "joint",
    "lwf",
    "ewc_online",
    *(
        f"{s}-{b}"
        for s in ("er", "der", "derpp", "agem", "er_ace", "gdumb", "icarl")
        for b in (200, 500, 5120)
    ),
]
# The DER paper's Table 2, Seq-MNIST (means of 10 runs): class-IL; task-IL where quoted.
PAPER_CLASS_IL = {
    "sgd": 19.60,
    "joint": 95.57,
    "lwf": 19.62,
    "ewc_online": 20.46,
    "er-200": 80.43,
    "er-500": 86.12,
    "er-5120": 93.40,
    "der-200": 84.55,
    "der-500": 90.54,
    "der-5120": 94.90,
    "derpp-200": 85.61,
    "derpp-500": 91.00,
    "derpp-5120": 95.30,
    "agem-200": 45.72,
    "agem-500": 46.66,
    "icarl-200": 70.51,
    "icarl-500": 70.10,
}
PAPER_TASK_IL = {"er-200": 97.86, "er-500": 99.04, "derpp-200": 98.76, "derpp-500": 98.94}
SPEED_CELL = "er-500"
TRAIN_IMAGES = 60_000
# The MLP's multiply-adds per sample (784-100-100-10) and floating-point operations per
# sample and step: forward 2 x, backward 4 x the multiply-adds.
MLP_MACS = 784 * 100 + 100 * 100 + 100 * 10
FLOPS_PER_SAMPLE = 6 * MLP_MACS


def prepared(from_dir: str | None, data_dir: str | None) -> str:
    """A TFDS data dir holding mnist: `data_dir`, or a new one prepared from `from_dir`."""
    if data_dir:
        return data_dir
    data_dir = tempfile.mkdtemp(prefix="seq-mnist-tfds-")
    command = [sys.executable, "-m", "cljax.data.prepare", "mnist", f"--from_dir={from_dir}"]
    subprocess.run([*command, f"--data_dir={data_dir}"], check=True, cwd=REPO)
    return data_dir


def train(cell: str, seed: int, data_dir: str, workdir: str) -> dict:
    """One `python -m cljax.train` run of `mnist_der:cell`; its metrics and process time."""
    command = [
        sys.executable,
        "-m",
        "cljax.train",
        f"--config=mnist_der:{cell}",
        f"--config.seed={seed}",
        f"--config.dataset.data_dir={data_dir}",
        f"--workdir={workdir}",
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    process_s = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{cell} seed {seed} failed: {result.stderr.strip().splitlines()[-1]}")
    with open(os.path.join(workdir, "metrics.json")) as file:
        metrics = json.load(file)
    return {**metrics, "process_s": process_s}


def grid(args, data_dir: str) -> None:
    results: dict[str, list[dict]] = {}
    for cell in args.cells:
        for seed in args.seeds:
            metrics = train(cell, seed, data_dir, os.path.join(args.out, f"{cell}-{seed}"))
            row = {
                "cell": cell,
                "seed": seed,
                "class_il": round(100 * metrics["final_average_accuracy"], 2),
                "task_il": _percent(metrics.get("task_il_final_average_accuracy")),
                "train_time_s": round(metrics["train_time_s"], 2),
                "wall_time_s": round(metrics["wall_time_s"], 2),
            }
            results.setdefault(cell, []).append(row)
            print(json.dumps(row), flush=True)
    print(table(results, len(args.seeds)))


def table(results: dict[str, list[dict]], seeds: int) -> str:
    lines = [
        f"| cell | class-IL, cljax ({seeds} seeds) | class-IL, DER paper | task-IL, cljax |"
        " task-IL, DER paper |",
        "| --- | --- | --- | --- | --- |",
    ]
    for cell, rows in results.items():
        task_il = [row["task_il"] for row in rows if row["task_il"] is not None]
        lines.append(
            f"| {cell} | {_mean_std([row['class_il'] for row in rows])} |"
            f" {PAPER_CLASS_IL.get(cell, '')} | {_mean_std(task_il) if task_il else '-'} |"
            f" {PAPER_TASK_IL.get(cell, '-')} |"
        )
    return "\n".join(lines)


def speed(args, data_dir: str) -> None:
    python = avalanche_python(args.avalanche_venv)
    runs: dict[str, list[dict]] = {"cljax": [], "avalanche": []}
    for index in range(args.runs):
        order = ("cljax", "avalanche") if index % 2 == 0 else ("avalanche", "cljax")
        for library in order:
            if library == "cljax":
                workdir = os.path.join(args.out, f"speed-{index}")
                metrics = train(SPEED_CELL, 0, data_dir, workdir)
                run = {
                    "train_s": metrics["train_time_s"],
                    "run_s": metrics["wall_time_s"],
                    "process_s": metrics["process_s"],
                    "class_il": metrics["final_average_accuracy"],
                }
            else:
                run = avalanche_run(python, args.from_dir)
            run["images_per_s"] = TRAIN_IMAGES / run["train_s"]
            runs[library].append(run)
            print(json.dumps({"library": library, "run": index, **_rounded(run)}), flush=True)
    medians = {
        library: {key: statistics.median(run[key] for run in done) for key in done[0]}
        for library, done in runs.items()
    }
    achieved = medians["cljax"]["images_per_s"] * FLOPS_PER_SAMPLE * 2  # b + r rows per sample
    matmul = dense_matmul_flops()
    plain_s = plain_jax_train_s()
    summary = {
        "medians": {library: _rounded(values) for library, values in medians.items()},
        "images_per_s_ratio": medians["cljax"]["images_per_s"]
        / medians["avalanche"]["images_per_s"],
        "run_time_ratio": medians["avalanche"]["run_s"] / medians["cljax"]["run_s"],
        "process_time_ratio": medians["avalanche"]["process_s"] / medians["cljax"]["process_s"],
        "cljax_training_gflops": achieved / 1e9,
        "dense_matmul_gflops": matmul / 1e9,
        "fraction_of_dense_matmul_rate": achieved / matmul,
        "plain_jax_train_s": plain_s,
        "cljax_train_over_plain_jax": medians["cljax"]["train_s"] / plain_s,
    }
    print(json.dumps(_rounded(summary)))


def avalanche_python(venv: str) -> str:
    """The Python of the Avalanche virtualenv, made first if it does not exist."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        packages = ["torch==2.14.1", "torchvision==0.29.1", "avalanche-lib==0.6.0"]
        subprocess.run([python, "-m", "pip", "install", "-q", *packages], check=True)
    return python


def avalanche_run(python: str, from_dir: str) -> dict:
    script = str(REPO / "benchmarks" / "avalanche_er.py")
    start = time.perf_counter()
    result = subprocess.run(
        [python, script, from_dir], capture_output=True, text=True, env=_one_thread_less()
    )
    process_s = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"avalanche failed: {result.stderr[-2000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "process_s": process_s}


def _one_thread_less() -> dict:
    """This environment for the Avalanche process (PyTorch picks its own thread count)."""
    return {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}


def dense_matmul_flops(size: int = 1024, repeats: int = 20) -> float:
    """This CPU's float32 matrix-product rate in JAX (one device), the arithmetic limit the
    MLP's step is held against."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    product = jax.jit(lambda x: x @ x)
    product(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def plain_jax_train_s(steps: int = TRAIN_IMAGES // 10, rows: int = 20, block: int = 128) -> float:
    """Seconds this CPU takes for the protocol's training arithmetic alone: the MLP's SGD
    step at 20 rows (10 new, 10 replayed), written in plain JAX without cljax or a buffer,
    scanned `block` steps per call over device-resident batches; the median of 3 passes."""
    import jax
    import jax.numpy as jnp

    sizes = (784, 100, 100, 10)
    keys = jax.random.split(jax.random.key(0), len(sizes) - 1)
    params = [
        (0.05 * jax.random.normal(key, (fan_in, fan_out)), jnp.zeros(fan_out))
        for key, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]

    def loss(params, inputs, labels):
        hidden = inputs
        for index, (weights, bias) in enumerate(params):
            hidden = hidden @ weights + bias
            hidden = jax.nn.relu(hidden) if index < len(params) - 1 else hidden
        log_probs = jax.nn.log_softmax(hidden)
        return -jnp.take_along_axis(log_probs, labels[:, None], axis=1).mean()

    def step(params, batch):
        gradients = jax.grad(loss)(params, *batch)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, gradients), None

    blocks = jax.jit(lambda params, batch: jax.lax.scan(step, params, batch)[0])
    batch = (jnp.ones((block, rows, 784)), jnp.zeros((block, rows), jnp.int32))
    params = jax.block_until_ready(blocks(params, batch))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps // block):
            params = blocks(params, batch)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * steps / (steps // block * block)


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def _percent(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 2)


def _rounded(values: dict) -> dict:
    return {
        key: round(value, 3) if isinstance(value, float) else value for key, value in values.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--from_dir", help="the four MNIST IDX files (prepared into a new data dir)"
    )
    parser.add_argument("--data_dir", help="a TFDS data dir that holds mnist already")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--cells", nargs="+", default=CELLS, choices=CELLS)
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="seq-mnist-"))
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--avalanche_venv", default=os.path.expanduser("~/.cache/cljax/avalanche-venv")
    )
    args = parser.parse_args()
    if not (args.from_dir or args.data_dir) or (args.speed and not args.from_dir):
        parser.error("give --from_dir (and, for --speed, it is required) or --data_dir")
    data_dir = prepared(args.from_dir, args.data_dir)
    speed(args, data_dir) if args.speed else grid(args, data_dir)


if __name__ == "__main__":
    main()
