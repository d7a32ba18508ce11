"""What checkpoints cost: train time with and without them, and write time per GiB.

    python benchmarks/checkpoint_overhead.py [--repeats 3] [--every_steps 200] [--folder DIR]
        [--cases digits resnet18_64] [--buffer_gib 0.25 1.0]

Train and checkpoint time (metrics.json's `train_time_s` + `checkpoint_time_s`: the
training steps, compilation included, and the time training waited for checkpoints to be
saved) of real runs of `python -m cljax.train`, each case run with
`checkpoint.every_steps=N` and with 0 (only the end-of-task checkpoints, which both
settings save), interleaved A B A B ... so machine noise hits both alike:

- `digits`: the default experiment;
- `resnet18_64`: configs/imagenet_resnet18.py on a synthetic image folder at 64x64 (the
  flags of benchmarks/data_wait.py).

Prints one JSON line per case and setting (median train + checkpoint time, median
checkpoint time, checkpoints written, size of the last checkpoint), one line per case
with the overhead ratio, and one line per buffer size with the time to write a sharded
uint8 buffer of that size through `cljax.checkpoint.Checkpoints` on 4 simulated devices
(the blocking part, during which training waits, and the whole write).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from data_wait import RESNET18, folder

GIB = 1 << 30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every_steps", type=int, default=200)
    parser.add_argument("--folder", default=None)
    parser.add_argument("--cases", nargs="*", default=["digits", "resnet18_64"])
    parser.add_argument("--buffer_gib", type=float, nargs="*", default=[0.25, 1.0])
    return parser.parse_args()


def directory_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def run(flags: list[str]) -> dict:
    """Train + checkpoint time of one run, its checkpoints written and the last one's bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.join(tmp, "run")
        subprocess.run(
            [sys.executable, "-m", "cljax.train", *flags, f"--workdir={workdir}"],
            check=True,
            capture_output=True,
        )
        with open(os.path.join(workdir, "metrics.json")) as file:
            metrics = json.load(file)
        checkpoints = os.path.join(workdir, "checkpoints")
        last = max(os.listdir(checkpoints), key=int)
        total_steps = int(last)
        every = int(next(f for f in flags if "every_steps" in f).split("=")[1])
        tasks = len(metrics["accuracy_matrix"])
        mid_task = total_steps // every if every else 0
        return {
            "time_s": metrics["train_time_s"] + metrics["checkpoint_time_s"],
            "checkpoint_time_s": metrics["checkpoint_time_s"],
            "checkpoints": tasks + mid_task,
            "checkpoint_bytes": directory_bytes(os.path.join(checkpoints, last)),
        }


def train_time_overhead(name: str, flags: list[str], every_steps: int, repeats: int) -> None:
    settings = {every_steps: [], 0: []}
    for _ in range(repeats):
        for every, runs in settings.items():
            runs.append(run([*flags, f"--config.checkpoint.every_steps={every}"]))
    medians = {}
    for every, runs in settings.items():
        medians[every] = statistics.median(r["time_s"] for r in runs)
        line = {
            "case": name,
            "every_steps": every,
            "train_and_checkpoint_s": round(medians[every], 2),
            "all": [round(r["time_s"], 2) for r in runs],
            "checkpoint_time_s": round(statistics.median(r["checkpoint_time_s"] for r in runs), 3),
            "checkpoints_written": runs[0]["checkpoints"],
            "checkpoint_mib": round(runs[0]["checkpoint_bytes"] / (1 << 20), 2),
        }
        print(json.dumps(line), flush=True)
    ratio = medians[every_steps] / medians[0]
    print(json.dumps({"case": name, "time_ratio": round(ratio, 4)}), flush=True)


def write_time(gib_sizes: list[float]) -> None:
    """Seconds to write a sharded uint8 buffer of each size, in its own process."""
    for gib in gib_sizes:
        code = f"""
import json, tempfile, time
import jax, jax.numpy as jnp
from cljax import runtime as runtime_lib
runtime_lib.configure_cpu_devices(4)
from cljax import checkpoint
from cljax.data.pipeline import Position
runtime = runtime_lib.JaxRuntime(timeout_s=600)
rows = int({gib} * {GIB} / 4 // 150528) * 4
slots = jax.device_put(jnp.ones((rows, 224, 224, 3), jnp.uint8), runtime.sharded)
with tempfile.TemporaryDirectory() as workdir:
    saver = checkpoint.Checkpoints(workdir, runtime, keep=1)
    times = []
    for step in range(3):
        start = time.perf_counter()
        saver.save(step, {{"w": jnp.zeros(1)}}, {{"slots": slots}}, Position(), {{}})
        blocking = time.perf_counter() - start
        saver.wait()
        times.append((blocking, time.perf_counter() - start))
    saver.close()
blocking, total = sorted(times)[1]
print(json.dumps({{"buffer_gib": {gib}, "blocking_s": round(blocking, 3),
    "write_s": round(total, 3), "write_s_per_gib": round(total / {gib}, 3)}}))
"""
        subprocess.run([sys.executable, "-c", code], check=True)


def main() -> None:
    args = parse_args()
    path = folder(args.folder)
    cases = {
        "digits": [],
        "resnet18_64": [
            *RESNET18,
            f"--config.dataset.path={path}",
            "--config.dataset.image_size=64",
        ],
    }
    for name in args.cases:
        flags = cases[name]
        train_time_overhead(name, flags, args.every_steps, args.repeats)
    write_time(args.buffer_gib)


if __name__ == "__main__":
    main()
