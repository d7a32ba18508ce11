"""Start-up time of an image-folder dataset: listing its files, then reading the cached index.

    python benchmarks/imagefolder_startup.py [--folder DIR] [--classes 1000] [--per_class 100]

Writes (once, unless `--folder` names an existing one) an image folder in ImageNet's layout
with `classes` x `per_class` training files and 10 val files per class (every file the same
small JPEG: listing does not read them), then, each in a fresh Python process, loads it as
`dataset.name=imagefolder` does and reads one training image. `cold`: with an empty index
cache (the folder is listed); `warm`: the index read back from the cache. Prints one JSON
line per case with the medians of `--repeats` runs: `seconds` from the start of loading to
the first decoded image, `process_seconds` for the whole child process (Python start and
cljax's imports included).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from cljax.data import synthetic

CHILD = """
import sys, time
from cljax.data import sources, transforms
start = time.perf_counter()
dataset = sources.load("imagefolder", image_size=224, path=sys.argv[1])
transforms.decode(dataset.train.example(len(dataset.train) // 2))
print(time.perf_counter() - start, len(dataset.train), len(dataset.test))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=None)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per_class", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def write_folder(out: str, classes: int, per_class: int) -> str:
    image = synthetic.jpeg(np.full((32, 32, 3), 128, np.uint8))
    for split, count in (("train", per_class), ("val", 10)):
        for label in range(classes):
            folder = os.path.join(out, split, f"n{label:08d}")
            os.makedirs(folder, exist_ok=True)
            for index in range(count):
                with open(os.path.join(folder, f"{split}_{label}_{index}.JPEG"), "wb") as file:
                    file.write(image)
    return out


def load_seconds(path: str, cache: str) -> tuple[float, float, int]:
    """Seconds to load the folder and decode one image, in a fresh process, and that
    process's seconds from start to exit; images found."""
    env = {**os.environ, "CLJAX_CACHE_DIR": cache}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", CHILD, path], env=env, capture_output=True, text=True, check=True
    )
    process = time.perf_counter() - start
    seconds, train, test = result.stdout.split()
    return float(seconds), process, int(train) + int(test)


def main() -> None:
    args = parse_args()
    path = args.folder or os.path.join(tempfile.gettempdir(), "cljax-startup-folder")
    if not os.path.isdir(os.path.join(path, "train")):
        write_folder(path, args.classes, args.per_class)
    cache = tempfile.mkdtemp(prefix="cljax-startup-cache-")
    runs = {"cold": [], "warm": []}
    for _ in range(args.repeats):
        shutil.rmtree(cache, ignore_errors=True)
        runs["cold"].append(load_seconds(path, cache))
        runs["warm"].append(load_seconds(path, cache))
    shutil.rmtree(cache, ignore_errors=True)
    for case, times in runs.items():
        seconds, process, images = zip(*times, strict=True)
        line = {
            "case": case,
            "images": images[0],
            "seconds": round(statistics.median(seconds), 3),
            "process_seconds": round(statistics.median(process), 3),
            "all": [round(t, 3) for t in seconds],
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
