"""MNIST from its four standard IDX files, written as TFDS's own `mnist` dataset.

    python -m cljax.data.prepare mnist --from_dir=DIR [--data_dir=...]

`DIR` holds `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`
and `t10k-labels-idx1-ubyte`, each gzip-compressed (`.gz`, as distributed) or not. Every file
is checked (magic number, dimensions, size, labels 0-9, as many labels as images) before
anything is written; a bad or missing file is one `DatasetError` line naming it. The result is
the dataset TFDS's `mnist` builder writes (version, features, split names, PNG-encoded
images, record order), built with TFDS's own builder class and no TensorFlow.
"""

import gzip
import os

import cv2
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from cljax.errors import DatasetError

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
# Split -> (images file, labels file, number of samples), under the files' standard names.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
# IDX magic numbers: two zero bytes, the element type (0x08: unsigned byte), the dimensions.
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str, magic: int) -> np.ndarray:
    """The uint8 array of IDX file `path` (gzip-compressed or not), checked to start with
    `magic` and to hold exactly the bytes its dimensions say."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
        if raw[:2] == GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DatasetError(f"MNIST file {path} cannot be read ({error})") from None
    rank = magic & 0xFF
    header = 4 * (1 + rank)
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise DatasetError(
            f"MNIST file {path} is not an IDX file of {rank}-d unsigned bytes (magic {found},"
            f" expected {magic:08x})"
        )
    shape = tuple(int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in range(1, 1 + rank))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DatasetError(
            f"MNIST file {path} holds {len(raw)} bytes, not the {expected} of its header's"
            f" shape {shape}: it is truncated or damaged"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def find_file(from_dir: str, stem: str) -> str:
    """`stem.gz` or `stem` in `from_dir`."""
    for name in (f"{stem}.gz", stem):
        path = os.path.join(from_dir, name)
        if os.path.isfile(path):
            return path
    raise DatasetError(f"MNIST file {stem}[.gz] is missing from {from_dir}")


def read_split(from_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [n, 28, 28] and labels [n] of `split`, checked."""
    images_stem, labels_stem, count = FILES[split]
    images_path, labels_path = find_file(from_dir, images_stem), find_file(from_dir, labels_stem)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape != (count, *IMAGE_SHAPE):
        raise DatasetError(
            f"MNIST file {images_path} holds images of shape {images.shape}, not the"
            f" {(count, *IMAGE_SHAPE)} of MNIST's {split} split"
        )
    if labels.shape != (count,):
        raise DatasetError(
            f"MNIST file {labels_path} holds {labels.shape[0]} labels, not the {count} of"
            f" MNIST's {split} split"
        )
    if labels.max() >= NUM_CLASSES:
        raise DatasetError(f"MNIST file {labels_path} holds label {labels.max()}, above 9")
    return images, labels


with tfds.core.registered.skip_registration():

    class MnistFromIdx(tfds_mnist.MNIST):
        """TFDS's `mnist` builder reading local IDX files instead of downloading them."""

        name = "mnist"

        def __init__(self, *, from_dir: str, **kwargs):
            self.splits = {split: read_split(from_dir, split) for split in FILES}
            super().__init__(**kwargs)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split) for split in FILES}

        def _generate_examples(self, split: str):
            images, labels = self.splits[split]
            for index, (image, label) in enumerate(zip(images, labels, strict=True)):
                yield index, {"image": _png(image), "label": int(label)}


def _png(image: np.ndarray) -> bytes:
    """One grayscale image as PNG bytes (TFDS's `Image` feature stores PNG; encoding it
    ourselves keeps TensorFlow out)."""
    encoded, buffer = cv2.imencode(".png", image)
    if not encoded:
        raise DatasetError("an MNIST image could not be encoded as PNG")
    return buffer.tobytes()


def prepare(from_dir: str, data_dir: str) -> str:
    """Writes TFDS `mnist` into `data_dir` from the IDX files in `from_dir`; returns its
    directory."""
    builder = MnistFromIdx(from_dir=from_dir, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    return str(builder.data_dir)
