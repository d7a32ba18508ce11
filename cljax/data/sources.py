"""Datasets by name, read from TFDS array_record files with `tfds.data_source`.

Built-in datasets (`digits`) are TFDS builders inside cljax that are prepared into the
data dir on first use, with no download.
"""

import dataclasses
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from cljax.data.digits import Digits

BUILTIN_BUILDERS = {"digits": Digits}
DEFAULT_DATA_DIR = os.path.join("~", "tensorflow_datasets")


@dataclasses.dataclass(frozen=True)
class ArraySplit:
    """One split held in host memory: inputs in their stored dtype, int32 labels."""

    inputs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test splits plus what the model and buffer need to know about them."""

    name: str
    train: ArraySplit
    test: ArraySplit
    num_classes: int
    max_value: float

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.inputs.shape[1:]


def resolve_data_dir(data_dir: str | None) -> str:
    """`data_dir`, else $TFDS_DATA_DIR, else TFDS's default."""
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or DEFAULT_DATA_DIR)


def load(name: str, data_dir: str | None = None) -> Dataset:
    """Loads dataset `name`, building it first if it is one of cljax's built-in datasets."""
    data_dir = resolve_data_dir(data_dir)
    if name not in BUILTIN_BUILDERS:
        raise ValueError(
            f"dataset.name={name!r} is not known; use one of {sorted(BUILTIN_BUILDERS)}"
        )
    builder = BUILTIN_BUILDERS[name](data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        logging.info("Building dataset %s into %s", name, builder.data_dir)
        builder.download_and_prepare()
    sources = tfds.data_source(name, data_dir=data_dir)
    train, test = (_read_split(sources[split]) for split in ("train", "test"))
    num_classes = builder.info.features["label"].num_classes
    max_value = getattr(builder, "MAX_VALUE", float(np.iinfo(train.inputs.dtype).max))
    return Dataset(name, train, test, num_classes, max_value)


def _read_split(source) -> ArraySplit:
    records = source.__getitems__(list(range(len(source))))
    inputs = np.stack([record["image"] for record in records])
    labels = np.asarray([record["label"] for record in records], dtype=np.int32)
    return ArraySplit(inputs, labels)
