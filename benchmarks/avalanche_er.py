"""Avalanche 0.6's experience replay on Split MNIST, for `seq_mnist.py --speed` to time beside
cljax's. Run by the Python of a virtualenv holding torch and avalanche-lib (never cljax's):

    AVALANCHE_VENV/bin/python benchmarks/avalanche_er.py DIR_OF_MNIST_IDX_FILES

The protocol of `mnist_der:er-500`: 5 tasks of 2 classes in order, an MLP 784-100-100-10
(ReLU), plain SGD at 0.1, batch 10 with a replay minibatch of 10, one epoch per task, a
reservoir buffer of 500 (Avalanche's `ReplayPlugin` with `ReservoirSamplingBuffer`, which
adds each task's samples at its end), inputs in [0, 1]; after each task, the class-IL
accuracy on all 10,000 test images. Prints one JSON line: the training time (the strategy's
`train` calls), the whole run's time (from the IDX files to the last evaluation, as cljax's
`wall_time_s` counts from its prepared files: reading them, building the benchmark, the model
and the strategy, training and evaluating), the loop's alone, and the final accuracy.
"""

import gzip
import json
import os
import sys
import time

import numpy as np
import torch
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from avalanche.training.storage_policy import ReservoirSamplingBuffer
from avalanche.training.supervised import Naive
from torch.utils.data import TensorDataset

BATCH, REPLAY, BUFFER, LEARNING_RATE, TASKS = 10, 10, 500, 0.1, 5


def idx(directory: str, stem: str) -> np.ndarray:
    """An MNIST IDX file's array (gzip-compressed or not)."""
    path = os.path.join(directory, stem)
    opener, path = (gzip.open, path + ".gz") if os.path.exists(path + ".gz") else (open, path)
    with opener(path, "rb") as file:
        raw = file.read()
    rank = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * rank).reshape(shape)


class Split(TensorDataset):
    """Images in [0, 1] with their labels as `targets`, as Avalanche reads them."""

    def __init__(self, directory: str, prefix: str):
        images = idx(directory, f"{prefix}-images-idx3-ubyte")
        labels = idx(directory, f"{prefix}-labels-idx1-ubyte")
        super().__init__(
            torch.from_numpy(images.astype(np.float32) / 255).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
        )
        self.targets = labels.astype(np.int64).tolist()


def main() -> None:
    directory = sys.argv[1]
    setup_start = time.perf_counter()
    torch.manual_seed(0)
    benchmark = class_incremental_benchmark(
        {"train": Split(directory, "train"), "test": Split(directory, "t10k")},
        class_order=list(range(10)),
        num_experiences=TASKS,
    )
    model = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(784, 100),
        torch.nn.ReLU(),
        torch.nn.Linear(100, 100),
        torch.nn.ReLU(),
        torch.nn.Linear(100, 10),
    )
    replay = ReplayPlugin(
        mem_size=BUFFER,
        batch_size=BATCH,
        batch_size_mem=REPLAY,
        storage_policy=ReservoirSamplingBuffer(BUFFER),
    )
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LEARNING_RATE),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=BATCH,
        train_epochs=1,
        eval_mb_size=1000,
        plugins=[replay],
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
    )
    start, train_s, accuracy = time.perf_counter(), 0.0, None
    setup_s = start - setup_start
    for experience in benchmark.train_stream:
        train_start = time.perf_counter()
        strategy.train(experience)
        train_s += time.perf_counter() - train_start
        results = strategy.eval(benchmark.test_stream)
        accuracy = next(v for k, v in results.items() if k.startswith("Top1_Acc_Stream"))
    run_s = time.perf_counter() - start
    print(
        json.dumps(
            {"train_s": train_s, "run_s": setup_s + run_s, "loop_s": run_s, "class_il": accuracy}
        )
    )


if __name__ == "__main__":
    main()
