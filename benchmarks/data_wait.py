"""How long training waits for data: `data_wait_fraction` of metrics.json on real runs.

    python benchmarks/data_wait.py [--repeats 3] [--folder DIR]

Runs, each `--repeats` times in a fresh process with `python -m cljax.train`:

- `digits`: the default experiment (data held in memory, no input workers);
- `resnet18_<size>`: configs/imagenet_resnet18.py on a synthetic ImageNet-like image folder
  (JPEG, sides 300 to 500 pixels, 10 classes of 32 training and 8 val images, written once
  by cljax.data.synthetic unless `--folder` names one), 2 tasks of 2 epochs, 4 devices of
  batch 4, c = r = 2, the default input workers; at 224x224 (ImageNet's size) and at 64x64
  (a step 12 times cheaper, so the same decoding weighs 12 times more).

Prints one JSON line per case with the median `data_wait_fraction` (data_wait_s /
train_time_s; train time includes compilation), the median train time and the number of
input workers the run chose.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from cljax.data import synthetic

RESNET18 = [
    "--config=imagenet_resnet18",
    "--config.dataset.name=imagefolder",
    "--config.scenario.num_tasks=2",
    "--config.epochs_per_task=2",
    "--config.batch_size=4",
    "--config.buffer.num_candidates=2",
    "--config.buffer.num_representatives=2",
    "--config.eval_batch_size=32",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", default=None)
    return parser.parse_args()


def folder(path: str | None) -> str:
    out = path or os.path.join(tempfile.gettempdir(), "cljax-data-wait-folder")
    if not os.path.isdir(os.path.join(out, "train")):
        synthetic.write_imagefolder(out, synthetic.Spec(10, 32, 8))
    return out


def run(flags: list[str]) -> dict:
    """metrics.json of one run of `python -m cljax.train` with `flags`."""
    with tempfile.TemporaryDirectory() as workdir:
        subprocess.run(
            [sys.executable, "-m", "cljax.train", *flags, f"--workdir={workdir}/run"],
            check=True,
            capture_output=True,
        )
        with open(os.path.join(workdir, "run", "metrics.json")) as file:
            return json.load(file)


def main() -> None:
    args = parse_args()
    path = folder(args.folder)
    cases = {"digits": []}
    for size in (224, 64):
        cases[f"resnet18_{size}"] = [
            *RESNET18,
            f"--config.dataset.path={path}",
            f"--config.dataset.image_size={size}",
        ]
    for case, flags in cases.items():
        runs = [run(flags) for _ in range(args.repeats)]
        fractions = [r["data_wait_fraction"] for r in runs]
        line = {
            "case": case,
            "data_wait_fraction": round(statistics.median(fractions), 5),
            "all": [round(fraction, 5) for fraction in fractions],
            "train_time_s": round(statistics.median(r["train_time_s"] for r in runs), 1),
            "worker_count": runs[0]["config"]["dataset"]["worker_count"],
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
