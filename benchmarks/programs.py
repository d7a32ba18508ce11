"""Time to a train step's first result with and without the programs cljax keeps on disk.

    python benchmarks/programs.py [--model resnet18 --image_size 32 --batch_size 32]
        [--strategy er] [--dtype float32] [--repeats 3]

Each measurement is a fresh process that builds cljax's train step (`benchmarks/stepbench.py`)
and times its first call to the result: with the program read back from `cljax.programs`
(`kept`), or traced, lowered and compiled from JAX's persistent cache as without it
(`plain`). Both caches are warmed by a first pair of processes that is not counted; the
others alternate. Prints one JSON line per process and a summary line: medians of the first
call and of a later step, and what keeping the program saves (the first call less a step).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODES = ("plain", "kept")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--strategy", default="er")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache_dir", help="the caches' folder; default: a new temporary one")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one process
    return parser.parse_args()


def measure(args: argparse.Namespace) -> dict:
    """In this process: the step built and called with the program kept or plain."""
    import stepbench

    stepbench.start(1)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(args.cache_dir, "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    case = stepbench.Case(
        model=args.model,
        image_size=args.image_size,
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        strategy=args.strategy,
        dtype=args.dtype,
    )
    bench = stepbench.build(case)
    start = time.perf_counter()
    bench.compiled = bench.step  # called as it is, at its first call traced or read back
    bench.run(1)
    first_s = time.perf_counter() - start
    step_s = statistics.median(bench.timed_steps() for _ in range(3))
    return {**case.summary(), "mode": args.mode, "first_call_s": first_s, "step_s": step_s}


def main() -> None:
    args = parse_args()
    if args.mode:
        print(json.dumps(measure(args)), flush=True)
        return
    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="cljax-programs-bench-")
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats + 1):
        for mode in MODES if repeat % 2 else reversed(MODES):
            run = _child(args, mode)
            if repeat:  # the first pair fills the caches
                runs[mode].append(run)
                print(json.dumps(_rounded(run)), flush=True)
    timed = ("first_call_s", "step_s")
    medians = {
        mode: {key: statistics.median(run[key] for run in done) for key in timed}
        for mode, done in runs.items()
    }
    saved = {mode: values["first_call_s"] - values["step_s"] for mode, values in medians.items()}
    print(
        json.dumps(
            {
                "medians": {mode: _rounded(values) for mode, values in medians.items()},
                "start_up_s": _rounded(saved),
                "saved_s": round(saved["plain"] - saved["kept"], 3),
            }
        ),
        flush=True,
    )


def _child(args: argparse.Namespace, mode: str) -> dict:
    """One measuring process; `CLJAX_CACHE_DIR` points cljax's programs at `cache_dir`."""
    command = [sys.executable, __file__, f"--mode={mode}", f"--cache_dir={args.cache_dir}"]
    for name in ("model", "image_size", "num_classes", "batch_size", "strategy", "dtype"):
        command.append(f"--{name}={getattr(args, name)}")
    environment = {**os.environ, "CLJAX_CACHE_DIR": args.cache_dir}
    if mode == "plain":
        environment["CLJAX_KEEP_PROGRAMS"] = "0"
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode:
        sys.exit(f"the {mode} process failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _rounded(values: dict) -> dict:
    return {key: round(v, 4) if isinstance(v, float) else v for key, v in values.items()}


if __name__ == "__main__":
    main()
