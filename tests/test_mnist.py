"""Real MNIST: the four IDX files prepared as TFDS's `mnist`, checked on the way, and the DER
paper's Split MNIST trained on it. Needs `../shared/data/mnist` (or `$CLJAX_MNIST_DIR`);
the tests that read it skip without it. Damaged files are made here from scratch."""

import gzip
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cljax import errors
from cljax.data import mnist, sources
from tests.helpers import REPO, run_process, subprocess_env

MNIST_DIR = pathlib.Path(os.environ.get("CLJAX_MNIST_DIR", REPO.parent / "shared/data/mnist"))
needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"the real MNIST IDX files are not at {MNIST_DIR} (set $CLJAX_MNIST_DIR)",
)
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args...` from the clone."""
    return run_process(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )


def prepare(from_dir, data_dir) -> subprocess.CompletedProcess:
    return run_module(
        "cljax.data.prepare", "mnist", f"--from_dir={from_dir}", f"--data_dir={data_dir}"
    )


@pytest.fixture(scope="session")
def mnist_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir holding `mnist`, prepared from the real IDX files by the command."""
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the real MNIST IDX files are not at {MNIST_DIR}")
    data_dir = tmp_path_factory.mktemp("mnist_tfds")
    result = prepare(MNIST_DIR, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Prepared mnist in" in result.stdout
    return str(data_dir)


@pytest.mark.slow
@needs_mnist
def test_prepared_mnist_is_tfds_mnist_with_every_image_and_label(mnist_data_dir):
    dataset = sources.load("mnist", mnist_data_dir)
    assert (dataset.num_classes, dataset.input_shape) == (10, (28, 28, 1))
    assert (len(dataset.train), len(dataset.test)) == (60_000, 10_000)
    assert np.bincount(dataset.train.labels).tolist() == TRAIN_COUNTS
    images, labels = mnist.read_split(str(MNIST_DIR), "test")
    # Every (image, label) pair survives the PNG round trip; TFDS orders records by a hash
    # of their keys (the IDX index, as TFDS's own builder uses).
    prepared = zip(dataset.test.inputs[..., 0], dataset.test.labels, strict=True)
    original = zip(images, labels, strict=True)
    assert sorted((x.tobytes(), int(y)) for x, y in prepared) == sorted(
        (x.tobytes(), int(y)) for x, y in original
    )
    info = json.loads((pathlib.Path(mnist_data_dir) / "mnist/3.0.1/dataset_info.json").read_text())
    assert info["name"] == "mnist" and info["fileFormat"] == "array_record"


def write_idx(path: pathlib.Path, array: np.ndarray, magic: int, compress: bool) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", r"train-labels-idx1-ubyte\[\.gz\] is missing from"),
        ("magic", r"train-images-idx3-ubyte is not an IDX file of 3-d unsigned bytes"),
        ("truncated", r"train-images-idx3-ubyte holds \d+ bytes, not the \d+ of its header"),
        ("count", r"train-images-idx3-ubyte holds images of shape \(100, 28, 28\), not the"),
        ("gzip", r"train-images-idx3-ubyte.gz cannot be read"),
    ],
)
def test_a_damaged_idx_file_is_one_line_naming_it(damage, message, tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    images = np.zeros((100 if damage == "count" else 60_000, 28, 28), np.uint8)
    name = "train-images-idx3-ubyte"
    if damage == "gzip":
        (folder / f"{name}.gz").write_bytes(b"\x1f\x8b" + b"not gzip at all")
    else:
        write_idx(folder / name, images, 0x0801 if damage == "magic" else 0x0803, False)
    if damage == "truncated":
        (folder / name).write_bytes((folder / name).read_bytes()[:-10])
    if damage != "missing":
        write_idx(folder / "train-labels-idx1-ubyte", np.zeros(60_000), 0x0801, True)
    result = prepare(folder, tmp_path / "data")
    assert result.returncode == errors.EXIT_BAD_INPUT, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("cljax: MNIST file ")
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "data" / "mnist").exists() or not any(
        (tmp_path / "data" / "mnist").rglob("*.array_record*")
    )


def test_read_idx_accepts_the_files_uncompressed_and_gzipped(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "plain", labels, 0x0801, False)
    write_idx(tmp_path / "zipped", labels, 0x0801, True)
    for name in ("plain", "zipped"):
        assert mnist.read_idx(str(tmp_path / name), 0x0801).tolist() == labels.tolist()


@needs_mnist
@pytest.mark.slow
def test_split_mnist_er_200_reaches_the_papers_accuracy(mnist_data_dir, tmp_path):
    """The DER paper's Seq-MNIST ER cell with a buffer of 200, seed 0: class-IL at least 0.78
    (the paper: 80.43 on average over 10 runs)."""
    workdir = tmp_path / "run"
    result = run_module(
        "cljax.train",
        "--config=mnist_der:er-200",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={mnist_data_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((workdir / "metrics.json").read_text())
    assert written["final_average_accuracy"] >= 0.78
    assert written["task_il_final_average_accuracy"] >= written["final_average_accuracy"]
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
