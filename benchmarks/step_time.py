"""Compile time, step time, images/s and peak memory of the train step, by model and strategy.

    python benchmarks/step_time.py --model resnet50 --image_size 224 --batch_size 56 \\
        --dtype bfloat16 --strategies incremental er [--steps 5] [--devices 1] \\
        [--batch_norm global]

The step is cljax's own (`steps.make_train_step`) on one mesh of `--devices` devices, fed
random uint8 images already on the devices (the input pipeline is measured by
benchmarks/input_pipeline.py). ER uses r representatives and c candidates per device
(the paper's r = 7, c = 14 by default) and a buffer of `--buffer_per_class` slots per class;
replayed samples are augmented on the device as in training (`inception`). Prints one JSON
line per strategy: compile seconds, median step seconds over `--steps` steps after one
warm-up, images/s (new samples per second, all devices), and peak device memory where the
backend reports it. `--batch_norm` is the config's `model.batch_norm`: BatchNorm statistics
over every device's rows (`global`) or each device's own (`per_device`).
"""

import argparse
import json
import statistics
import time

import jax

from cljax.models import BATCH_NORM


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--model_args", default="{}", help="JSON of model arguments")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=56)
    parser.add_argument("--num_candidates", type=int, default=14)
    parser.add_argument("--num_representatives", type=int, default=7)
    parser.add_argument("--buffer_per_class", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--strategies", nargs="+", default=["incremental", "er"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch_norm", default="global", choices=BATCH_NORM)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import stepbench

    runtime = stepbench.start(args.devices)
    for strategy in args.strategies:
        case = stepbench.Case(
            model=args.model,
            model_args=json.loads(args.model_args),
            image_size=args.image_size,
            num_classes=args.num_classes,
            batch_size=args.batch_size,
            strategy=strategy,
            num_candidates=args.num_candidates,
            num_representatives=args.num_representatives,
            buffer_per_class=args.buffer_per_class,
            dtype=args.dtype,
            batch_norm=args.batch_norm,
        )
        bench = stepbench.build(case, devices=args.devices)
        start = time.perf_counter()
        bench.compile()
        compile_s = time.perf_counter() - start
        bench.run(1)
        times = [bench.timed_steps() for _ in range(args.steps)]
        step_s = statistics.median(times)
        if not runtime.is_main:
            continue
        print(
            json.dumps(
                {
                    **case.summary(),
                    "devices": args.devices,
                    "backend": jax.default_backend(),
                    "compile_s": round(compile_s, 2),
                    "step_s": round(step_s, 4),
                    "step_s_all": [round(t, 4) for t in times],
                    "images_per_s": round(args.batch_size * args.devices / step_s, 1),
                    "peak_memory_gib": bench.peak_memory_gib(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
