"""Final average accuracy of each strategy on split digits (5 x 2, MLP), several seeds.

    python benchmarks/digits_strategies.py [--seeds 0 1 2] [--strategies er from_scratch]

Runs the default experiment (4 simulated CPU devices, memory 200 samples in total) with
only `strategy.name` and `seed` changed. Prints one JSON line per run and one summary
line per strategy with the mean accuracy, the issue's bar and the median train time (the
end-to-end runtime comparison: `--strategies incremental er from_scratch`).
"""

import argparse
import contextlib
import io
import json
import statistics
import tempfile

import jax

BARS = {
    "er": (">=", 0.88),
    "derpp": (">=", 0.90),
    "der": ("", ""),
    "from_scratch": (">=", 0.95),
    "incremental": ("<=", 0.25),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(BARS))
    parser.add_argument("--num_cpu_devices", type=int, default=4)
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)

    from cljax import configuration, trainer

    for strategy in args.strategies:
        accuracies, train_times = [], []
        for seed in args.seeds:
            config = configuration.load_config(f"default:{strategy}")
            config.num_cpu_devices, config.seed = args.num_cpu_devices, seed
            with contextlib.redirect_stdout(io.StringIO()):
                result = trainer.train_and_evaluate(config, tempfile.mkdtemp())
            accuracies.append(result["final_average_accuracy"])
            train_times.append(result["train_time_s"])
            print(json.dumps({"strategy": strategy, "seed": seed, **_numbers(result)}))
        mean = statistics.mean(accuracies)
        print(
            json.dumps(
                {
                    "strategy": strategy,
                    "mean_final_average_accuracy": mean,
                    "bar": " ".join(map(str, BARS.get(strategy, ("", "")))).strip(),
                    "median_train_time_s": round(statistics.median(train_times), 3),
                }
            )
        )


def _numbers(result: dict) -> dict:
    keys = ("final_average_accuracy", "average_forgetting", "backward_transfer", "train_time_s")
    return {key: round(result[key], 4) for key in keys}


if __name__ == "__main__":
    main()
