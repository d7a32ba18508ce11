"""Does the prefetch thread hide host data work? `data_wait_fraction` with and without it.

    python benchmarks/prefetch.py [--steps 200] [--host_fraction 0.5]

A jitted step on a 4-device CPU mesh (a stack of matmuls) stands for the train step; a
synthetic slow source takes `host_fraction` of the step time per batch, as storage latency
(reading from a parallel file system) plus light numpy work, then the batch is placed on
the mesh. The latency is a sleep: on a CPU-only machine, compute-bound host work would
compete with the "device" for the same cores, which is not the situation on accelerators.
The training loop places each batch on the mesh itself, as the trainer does. Each step is
waited for, so time spent fetching and placing is time the device sits idle;
`data_wait_fraction` = data_wait_s / loop time. Prints one JSON line per queue depth
(0: no thread, the loop reads each batch itself).
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 4)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cljax import runtime as runtime_lib  # noqa: E402
from cljax.data import prefetch  # noqa: E402

BATCH_SHAPE = (64, 32, 32, 3)


def make_step(runtime, width: int, depth: int):
    weights = jax.device_put(jnp.eye(width) * 0.5, runtime.replicated)

    @jax.jit
    def step(state, batch):
        x = batch.reshape(batch.shape[0], -1)[:, :width].astype(jnp.float32)
        for _ in range(depth):
            x = jnp.tanh(x @ weights)
        return state + x.sum()

    return step


def read_batch(index: int, latency_s: float) -> np.ndarray:
    """Slow-source stand-in: storage latency, then a batch of images."""
    time.sleep(latency_s)
    return np.random.default_rng(index).integers(0, 255, BATCH_SHAPE, dtype=np.uint8)


def median_seconds(fn, count: int = 20) -> float:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(step, runtime, steps: int, latency_s: float, depth: int) -> dict:
    def place(images):
        return runtime.place({"inputs": images})["inputs"]

    batches = (read_batch(i, latency_s) for i in range(steps))
    state = jnp.float32(0)
    start = time.perf_counter()
    wait = 0.0
    with contextlib.ExitStack() as stack:
        if depth > 0:
            batches = stack.enter_context(prefetch.Prefetcher(batches, depth=depth))
        while True:
            fetch = time.perf_counter()
            images = next(batches, None)
            batch = None if images is None else place(images)
            wait += time.perf_counter() - fetch
            if batch is None:
                break
            state = jax.block_until_ready(step(state, batch))
    total = time.perf_counter() - start
    return {
        "depth": depth,
        "steps": steps,
        "loop_s": round(total, 3),
        "data_wait_s": round(wait, 3),
        "data_wait_fraction": round(wait / total, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--host_fraction", type=float, default=0.5)
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()

    runtime = runtime_lib.JaxRuntime(timeout_s=300)
    step = make_step(runtime, width=512, depth=8)
    batch = runtime.place({"inputs": read_batch(0, 0.0)})["inputs"]
    state = jax.block_until_ready(step(jnp.float32(0), batch))
    step_s = median_seconds(lambda: jax.block_until_ready(step(state, batch)))
    latency_s = args.host_fraction * step_s
    host_s = median_seconds(lambda: runtime.place({"inputs": read_batch(0, latency_s)}))
    for depth in args.depths:
        result = run(step, runtime, args.steps, latency_s, depth)
        result.update(step_ms=round(1000 * step_s, 2), host_ms=round(1000 * host_s, 2))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
