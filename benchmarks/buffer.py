"""Buffer insert + global sample time per step, its compile time and program size, and bytes
received per device per step.

    python benchmarks/buffer.py [--devices 1 2 4 8] [--capacities 1000 10000 100000]
    python benchmarks/buffer.py --devices 8 16 32 64 --capacities 10000 --num_representatives 7

One process with as many simulated CPU devices as the largest D; each configuration uses a
mesh over the first D of them. A step is one jitted `shard_map` call that inserts c
candidates from a local batch of b samples, then draws r representatives from the global
buffer (the train step's order), with the buffer donated.
`recv_bytes_per_device` is read off the collectives of the traced step; `compile_s`,
`hlo_instructions` and `collective_ops` off its compilation. The simulated devices share
this machine's cores, so a step does the work of D devices: `step_ms_per_device` is the
step time divided by D. Prints one JSON line per configuration; step time should be flat in
capacity (in-place updates).
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cljax import buffer as buffer_lib
from cljax.collectives import AXIS, JaxCollectives, received_bytes

NUM_CLASSES = 10
SAMPLE_SHAPE = (28, 28, 1)
COLLECTIVE_OP = (
    r"\s(all-to-all|collective-permute|ragged-all-to-all|all-reduce|all-gather)(-start)?\("
)


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
    lowered = step.lower(state, inputs, labels, jax.random.key(0))
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    program = compiled.as_text()

    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, reps = compiled(state, inputs, labels, jax.random.key(i))
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
        "step_ms_per_device": round(1000 * statistics.median(times) / num_devices, 4),
        "compile_s": round(compile_s, 3),
        "hlo_instructions": program.count("\n"),
        "collective_ops": len(re.findall(COLLECTIVE_OP, program)),
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
    jax.config.update("jax_num_cpu_devices", max(args.devices))
    for num_devices in args.devices:
        for capacity in args.capacities:
            print(json.dumps(measure(num_devices, capacity, args)), flush=True)


if __name__ == "__main__":
    main()
