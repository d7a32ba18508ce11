"""Wall time of the default experiment as a user runs it: `python -m cljax.train`.

    python benchmarks/default_run.py [--repeats 3]

Each repeat is a fresh process. The first repeat uses an empty JAX compilation cache
(cold); later ones reuse it (warm). Prints one JSON line per run and a summary line
with the medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(workdir: str, cache_dir: str) -> dict:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "cljax.train", f"--workdir={workdir}"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.json")) as file:
        metrics = json.load(file)
    return {
        "process_s": round(elapsed, 2),
        "wall_time_s": round(metrics["wall_time_s"], 2),
        "train_time_s": round(metrics["train_time_s"], 2),
        "final_average_accuracy": round(metrics["final_average_accuracy"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cache_dir = tempfile.mkdtemp()
    runs = []
    for repeat in range(args.repeats):
        result = {
            "repeat": repeat,
            "cache": "cold" if repeat == 0 else "warm",
            **run_once(tempfile.mkdtemp(), cache_dir),
        }
        runs.append(result)
        print(json.dumps(result), flush=True)
    print(
        json.dumps(
            {
                "median_process_s": statistics.median(r["process_s"] for r in runs),
                "median_train_time_s": statistics.median(r["train_time_s"] for r in runs),
                "bar_process_s": 120,
            }
        )
    )


if __name__ == "__main__":
    main()
