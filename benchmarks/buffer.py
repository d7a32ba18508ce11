"""Buffer insert + global sample time per step, and bytes received per device per step.

    python benchmarks/buffer.py [--devices 1 2 4 8] [--capacities 1000 10000 100000]

One process with 8 simulated CPU devices; each configuration uses a mesh over the first D
of them. A step is one jitted `shard_map` call that inserts c candidates from a local batch
of b samples, then draws r representatives from the global buffer (the train step's
order), with the buffer donated.
`recv_bytes_per_device` is read off the collectives of the traced step. Prints one JSON
line per configuration; step time should be flat in capacity (in-place updates).
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cljax import buffer as buffer_lib  # noqa: E402
from cljax.collectives import AXIS, JaxCollectives, received_bytes  # noqa: E402

NUM_CLASSES = 10
SAMPLE_SHAPE = (28, 28, 1)


def make_step(mesh: Mesh, buffer: buffer_lib.RehearsalBuffer):
    def per_device(state, inputs, labels, key):
        device_key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
        batch = {"inputs": inputs, "labels": labels}
        state = buffer.insert(state, batch, jax.random.fold_in(device_key, 1))
        return state, buffer.sample(state, device_key, key, JaxCollectives())

    specs = (P(AXIS), P(AXIS), P(AXIS), P())
    shard = jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P(AXIS))
    sharding = NamedSharding(mesh, P(AXIS))
    out_shardings = (buffer.shardings(sharding), sharding)
    return shard, jax.jit(shard, donate_argnums=(0,), out_shardings=out_shardings)


def measure(num_devices: int, capacity: int, args) -> dict:
    mesh = Mesh(np.asarray(jax.devices()[:num_devices]), (AXIS,))
    sharding = NamedSharding(mesh, P(AXIS))
    example = {"inputs": jax.ShapeDtypeStruct(SAMPLE_SHAPE, np.dtype(np.uint8))}
    budget = capacity // NUM_CLASSES
    buffer = buffer_lib.rehearsal_buffer(
        NUM_CLASSES,
        budget,
        args.num_candidates,
        args.num_representatives,
        memory_kind=args.memory_kind,
    )
    state = buffer.init_sharded(example, sharding)
    rng = np.random.default_rng(0)
    global_batch = args.batch_size * num_devices
    inputs = jax.device_put(
        rng.integers(0, 255, (global_batch, *SAMPLE_SHAPE), dtype=np.uint8), sharding
    )
    labels = jax.device_put(rng.integers(0, NUM_CLASSES, global_batch).astype(np.int32), sharding)
    traced, step = make_step(mesh, buffer)
    jaxpr = jax.make_jaxpr(traced)(state, inputs, labels, jax.random.key(0)).jaxpr
    sample_jaxpr_bytes = received_bytes(jaxpr)

    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, reps = step(state, inputs, labels, jax.random.key(i))
        jax.block_until_ready((state, reps))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {
        "devices": num_devices,
        "memory_kind": args.memory_kind,
        "capacity": budget * NUM_CLASSES,
        "r": args.num_representatives,
        "c": args.num_candidates,
        "sample_bytes": buffer_lib.record_bytes(example),
        "step_ms": round(1000 * statistics.median(times), 3),
        "recv_bytes_per_device": sample_jaxpr_bytes,
        "buffer_bytes_per_device": int(np.prod(SAMPLE_SHAPE)) * capacity,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--capacities", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_candidates", type=int, default=8)
    parser.add_argument("--num_representatives", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--memory_kind", choices=buffer_lib.MEMORY_KINDS, default="device")
    args = parser.parse_args()
    for num_devices in args.devices:
        for capacity in args.capacities:
            print(json.dumps(measure(num_devices, capacity, args)), flush=True)


if __name__ == "__main__":
    main()
