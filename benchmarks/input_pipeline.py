"""Training images/s the input pipeline delivers, by number of Grain workers.

    python benchmarks/input_pipeline.py [--workers 1 2] [--folder DIR] [--images 1000]

On a synthetic ImageNet-like image folder (JPEG, sides of 300 to 500 pixels, written once
by cljax.data.synthetic unless `--folder` names one), the pipeline plans one task's training
batches (global batch `--batch_size`, one process, one device) with ImageNet's training
transform at 224x224 (`inception`: read, decode, random resized crop, flip) and the
prefetch thread hands them over; images/s counts the batches after the first `--warmup`
(worker start-up excluded) up to the last one received (the end of a stream, which Grain
takes a second to notice, comes once per run in training). The reference is a plain
single-process loop doing the same per-image work (read, decode, crop, flip): its rate is
one core's. Prints one JSON line for the reference and one per worker kind and count, with
`scaling` = rate / (workers x reference).
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from cljax.data import imagefolder, pipeline, prefetch, sources, synthetic, transforms


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--kinds", nargs="+", default=list(pipeline.WORKER_KINDS))
    parser.add_argument("--folder", default=None)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def folder(args) -> str:
    if args.folder and os.path.isdir(os.path.join(args.folder, "train")):
        return args.folder
    out = args.folder or tempfile.mkdtemp(prefix="cljax-imagefolder-")
    spec = synthetic.Spec(num_classes=20, train_per_class=args.images // 20, test_per_class=1)
    return synthetic.write_imagefolder(out, spec)


def reference_rate(split: imagefolder.FileSplit, size: int, count: int) -> float:
    """Images/s of one process reading, decoding, cropping and flipping in a plain loop."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for row in range(count):
        image = transforms.decode(split.example(row % len(split)))
        transforms.random_resized_crop(image, size, rng)
    return count / (time.perf_counter() - start)


def pipeline_rate(dataset: sources.Dataset, args, workers: int, kind: str) -> float:
    """Images/s delivered by the pipeline with `workers` Grain workers of `kind`, after
    warm-up."""
    rows = (np.arange(len(dataset.train)),)
    layout = pipeline.Layout(args.batch_size)
    loader = pipeline.Loader(
        train=dataset.train,
        test=dataset.test,
        task_rows=rows,
        layout=layout,
        views=pipeline.Views("inception", args.image_size),
        input_shape=dataset.input_shape,
        seed=0,
        eval_batch_size=args.batch_size,
    )
    items = [item for item in pipeline.plan(rows, 0, 1, args.batch_size, 1) if item.kind == "train"]
    with prefetch.Prefetcher(pipeline.batches(loader, items, workers, kind), depth=2) as feed:
        for _ in range(args.warmup):
            next(feed)
        start = last = time.perf_counter()
        count = 0
        for batch in feed:
            count += len(batch["inputs"])
            last = time.perf_counter()
    return count / (last - start)


def main() -> None:
    args = parse_args()
    path = folder(args)
    dataset = sources.load("imagefolder", image_size=args.image_size, path=path)
    references = [reference_rate(dataset.train, args.image_size, 300) for _ in range(args.repeats)]
    reference = statistics.median(references)
    print(json.dumps({"reference_images_per_s": round(reference, 1), "folder": path}), flush=True)
    for kind in args.kinds:
        for workers in args.workers:
            report(
                kind,
                workers,
                [pipeline_rate(dataset, args, workers, kind) for _ in range(args.repeats)],
                reference,
            )


def report(kind: str, workers: int, rates: list[float], reference: float) -> None:
    """One JSON line: the median rate of the repeats and its scaling against the reference."""
    rate = statistics.median(rates)
    line = {
        "workers": workers,
        "kind": kind,
        "images_per_s": round(rate, 1),
        "all": [round(r, 1) for r in rates],
        "scaling": round(rate / (max(workers, 1) * reference), 3),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
