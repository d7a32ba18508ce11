"""What rehearsal costs per step: ER against incremental training at batch b + r and b.

    python benchmarks/overhead.py [--devices 1] [--cases mlp cnn resnet18] [--rounds 20] \\
        [--steps_per_sample 5] [--min_sample_s 0.2] [--replicas 2]
    python benchmarks/overhead.py --cases resnet50 --profile /tmp/trace   # on a GPU
    srun --nodes 2 --ntasks-per-node 8 --gpus-per-task 1 \\
        python benchmarks/overhead.py --devices 16 --cases resnet50   # 2 nodes of 8 GPUs
    mpirun -n 2 python benchmarks/overhead.py --devices 4   # 2 processes on a CPU

Under a launcher (`srun`, `mpirun`, `mpiexec`) the processes join by jax.distributed as a
training run's do, and the mesh spans all `--devices` devices of all of them (on a CPU,
`--devices` simulated devices split evenly over the processes, their collectives over gloo):
the exchange and the all-reduce then cross processes, and nodes. Only process 0 prints.

Per case, three compiled train steps (cljax's own, on random device-resident batches, see
stepbench.py) on a mesh of `--devices` devices:

- A: ER, b new samples and r representatives per device, c candidates inserted;
- B: incremental at batch b + r (the same compute as A, without the buffer);
- C: incremental at batch b.

Each is built `--replicas` times: the same step, compiled and placed anew, runs a few
percent faster or slower on this machine for no reason in the step itself (memory
placement), and averaging over replicas shrinks that. After one warm-up step each, they run
interleaved, A B C A B C ... for `--rounds` rounds, each round starting one step further
along, so that machine noise, and whatever comes with running first or after a given other
step, hit all alike. Each letter is one timing sample: at least `--steps_per_sample` steps,
and enough of them (by a probe of A) to last `--min_sample_s`, so that a sample of a
sub-millisecond step is not one burst of machine noise. The steps run at the trainer's
cadence (step n's metrics are waited for once step n + 1 is queued, so the host's dispatch
of a step overlaps the devices' work on the one before, as in training); a sample's time is
divided by their number. With `--steps_per_sample 1 --min_sample_s 0` each sample is one
step's full latency, host dispatch included.

Prints one JSON line per case with the median step times (over all samples of all
replicas) and P1 = A/B, the cost of the buffer itself (limit 1.00), and P2 = A/C, the cost
of rehearsal, whose limit is the compute ratio (b + r)/b, also printed. `replica_spread` is
the largest gap between two replicas of one step (1.07 / 1.00 gives 0.07): a P1 within it of
1.00 is no measurable cost.

Cases (per-device b, r, c; r = b/8 and c = b/4 as in the paper's b = 56, r = 7, c = 14):
`mlp` (digits 8x8, the default experiment's b = 4, r = 4, c = 2), `cnn` (32x32x3, 100
classes, b = 32, r = 4, c = 8), `resnet18` (32x32x3, 100 classes, b = 32, r = 4, c = 8) and
`resnet50` (224x224x3, 1000 classes, bf16, b = 56, r = 7, c = 14, BatchNorm statistics per
device as in the paper's config; for a GPU).

`--profile DIR` also writes a `jax.profiler` trace of a few ER steps per case under DIR
(open it with TensorBoard's profile plugin or Perfetto), with the compiled step's HLO text
and the summary of cljax/profiling.py beside it, and adds that summary to the case's line as
`profile`: where the buffer's insert, draw and exchange run against the forward and backward
passes, and how much of their time no other work of the step hides.
"""

import argparse
import json
import math
import statistics

import jax

from cljax import profiling

CIFAR_SIZED = dict(
    image_size=32,
    num_classes=100,
    batch_size=32,
    num_representatives=4,
    num_candidates=8,
    dtype="float32",
)
CASES = {
    "mlp": dict(
        model="mlp",
        image_size=8,
        channels=1,
        num_classes=10,
        batch_size=4,
        num_representatives=4,
        num_candidates=2,
        dtype="float32",
    ),
    "cnn": dict(model="cnn", **CIFAR_SIZED),
    "resnet18": dict(model="resnet18", **CIFAR_SIZED),
    "resnet50": dict(
        model="resnet50",
        image_size=224,
        num_classes=1000,
        batch_size=56,
        num_representatives=7,
        num_candidates=14,
        dtype="bfloat16",
        batch_norm="per_device",
    ),
}


PROFILED_STEPS = 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=["mlp", "cnn", "resnet18"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps_per_sample", type=int, default=5)
    parser.add_argument("--min_sample_s", type=float, default=0.2)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--profile", help="write a profiler trace of ER steps here")
    return parser.parse_args()


def measure(name: str, args: argparse.Namespace, runtime) -> dict:
    import stepbench

    devices = args.devices
    case = CASES[name]
    b, r = case["batch_size"], case["num_representatives"]
    cases = {
        "er": stepbench.Case(**case, strategy="er"),
        "incremental_b_plus_r": stepbench.Case(
            **{**case, "batch_size": b + r}, strategy="incremental"
        ),
        "incremental_b": stepbench.Case(**case, strategy="incremental"),
    }
    benches = [
        (key, stepbench.build(bench_case, devices))
        for _ in range(args.replicas)
        for key, bench_case in cases.items()
    ]
    for _, bench in benches:
        bench.compile()
        bench.run(1)
    probe = benches[0][1].timed_steps(args.steps_per_sample)
    # Every process must run the same steps: process 0's count is everyone's.
    steps = max(args.steps_per_sample, math.ceil(args.min_sample_s / probe))
    steps = int(runtime.broadcast_text(str(steps)))
    samples = [[] for _ in benches]
    for round_index in range(args.rounds):
        for position in range(len(benches)):
            index = (round_index + position) % len(benches)
            samples[index].append(benches[index][1].timed_steps(steps))
    by_step = _replicas_by_step(benches, samples)
    median = {
        key: statistics.median(value for times in replicas for value in times)
        for key, replicas in by_step.items()
    }
    profile = {}
    if args.profile:
        trace_dir = f"{args.profile}/{name}"
        if runtime.process_count > 1:
            trace_dir += f"/process_{runtime.process_index}"
        profile = _profile(benches[0][1], trace_dir)
    return {
        "case": name,
        "devices": devices,
        "processes": runtime.process_count,
        "backend": jax.default_backend(),
        "b": b,
        "r": r,
        "c": case["num_candidates"],
        "steps_per_sample": steps,
        "replicas": args.replicas,
        **{f"{key}_step_s": round(value, 7) for key, value in median.items()},
        "P1": round(median["er"] / median["incremental_b_plus_r"], 4),
        "P2": round(median["er"] / median["incremental_b"], 4),
        "P2_compute_limit": round((b + r) / b, 4),
        "replica_spread": _replica_spread(by_step),
        "er_images_per_s": round(b * devices / median["er"], 1),
        "peak_memory_gib": benches[0][1].peak_memory_gib(),
        **profile,
    }


def _profile(bench, trace_dir: str) -> dict:
    """Traces a few ER steps into `trace_dir`, with the compiled step's HLO text and the
    summary of where the step's time goes beside the trace (cljax/profiling.py)."""
    profile = profiling.StepProfile(trace_dir, first=0, count=PROFILED_STEPS)
    profile.start(0)
    bench.run(PROFILED_STEPS)
    _, summary = profile.finish(PROFILED_STEPS, bench.compiled.as_text)
    return {"profile": summary}


def _replicas_by_step(benches: list, samples: list[list[float]]) -> dict[str, list[list[float]]]:
    """Each step's timing samples, one list per replica."""
    by_step: dict[str, list[list[float]]] = {}
    for (key, _), times in zip(benches, samples, strict=True):
        by_step.setdefault(key, []).append(times)
    return by_step


def _replica_spread(by_step: dict[str, list[list[float]]]) -> float | None:
    """The largest ratio, minus 1, between the median step times of two replicas of the same
    step: what the machine alone makes of identical work (None with one replica)."""
    medians = [[statistics.median(times) for times in replicas] for replicas in by_step.values()]
    if len(medians[0]) < 2:
        return None
    return round(max(max(step) / min(step) for step in medians) - 1, 4)


def main() -> None:
    args = parse_args()
    import stepbench

    runtime = stepbench.start(args.devices)
    for name in args.cases:
        line = measure(name, args, runtime)
        if runtime.is_main:
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
