"""Datasets by name, read from TFDS array_record files with `tfds.data_source`.

Built-in datasets (`digits`, `mnist1d`) are TFDS builders inside cljax, built into the
data dir on first use with no download. Any other name is a TFDS image-classification
dataset (`image` and `label` features) that must already be prepared in array_record
format (`python -m cljax.data.prepare NAME`). Small built-in datasets are held in memory;
TFDS datasets are read batch by batch, and only their labels are read up front.
"""

import dataclasses
import difflib
import json
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image

from cljax.data.digits import Digits
from cljax.data.mnist1d import Mnist1d

BUILTIN_BUILDERS = {"digits": Digits, "mnist1d": Mnist1d}
DEFAULT_DATA_DIR = os.path.join("~", "tensorflow_datasets")


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names it (or its file) and the fix."""


class DatasetNotPrepared(DatasetError):
    """A TFDS dataset that is missing from the data dir, or not in array_record format."""


class DatasetDamaged(DatasetError):
    """A prepared dataset whose files are missing, truncated or corrupted."""


class Split(Protocol):
    """One split: all labels in memory, inputs read on demand in their stored dtype."""

    labels: np.ndarray

    def __len__(self) -> int: ...

    def read(self, rows: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class ArraySplit:
    """A split held in host memory."""

    inputs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.inputs[rows]


@dataclasses.dataclass(frozen=True)
class SourceSplit:
    """A split read record by record from a TFDS data source (random access).

    With `image_size`, each image is resized (shorter side) and centre-cropped to a square
    of that size, for datasets whose images differ in size (e.g. imagenet2012).
    """

    source: Sequence[dict]
    labels: np.ndarray
    image_size: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, rows: np.ndarray) -> np.ndarray:
        images = (np.asarray(self.source[int(row)]["image"]) for row in rows)
        if self.image_size is not None:
            images = (resize_and_crop(image, self.image_size) for image in images)
        return np.stack(list(images))


def resize_and_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side of an HWC uint8 image to `size`, then crops the centre."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    resized_hw = (max(size, round(height * scale)), max(size, round(width * scale)))
    pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize(resized_hw[::-1], Image.Resampling.BILINEAR))
    top, left = (resized_hw[0] - size) // 2, (resized_hw[1] - size) // 2
    return resized[top : top + size, left : left + size].reshape(size, size, image.shape[-1])


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test splits plus what the model and buffer need to know about them."""

    name: str
    train: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    max_value: float
    natural_images: bool = False
    resizable: bool = False


def resolve_data_dir(data_dir: str | None) -> str:
    """`data_dir`, else $TFDS_DATA_DIR, else TFDS's default."""
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or DEFAULT_DATA_DIR)


def prepare_command(name: str, data_dir: str) -> str:
    return f"python -m cljax.data.prepare {name} --data_dir={data_dir}"


def load(name: str, data_dir: str | None = None, image_size: int | None = None) -> Dataset:
    """Loads dataset `name`, building it first if it is one of cljax's built-in datasets.

    `image_size` resizes a TFDS dataset's images to squares of that size.
    """
    data_dir = resolve_data_dir(data_dir)
    if name in BUILTIN_BUILDERS:
        return _load_builtin(name, data_dir)
    return _load_tfds(name, data_dir, image_size)


def build_if_builtin(name: str, data_dir: str | None = None) -> None:
    """Builds built-in dataset `name` into the data dir unless it is there already."""
    if name in BUILTIN_BUILDERS:
        _prepared_builtin(name, resolve_data_dir(data_dir))


def _prepared_builtin(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """The builder of built-in dataset `name`, built into `data_dir` if it was not there."""
    builder = BUILTIN_BUILDERS[name](data_dir=data_dir, file_format="array_record")
    if not os.path.exists(builder.data_dir):
        print(f"Building dataset {name} into {builder.data_dir}", flush=True)
        tfds.disable_progress_bar()
        try:
            builder.download_and_prepare()
        except OSError as error:
            raise DatasetError(
                f"dataset.data_dir={data_dir}: cannot build {name} there ({error.strerror});"
                " set --config.dataset.data_dir to a directory you can write to"
            ) from None
    fix = f"remove {builder.data_dir} and run again: it is rebuilt"
    verify_files(name, str(builder.data_dir), fix)
    return builder


def verify_files(name: str, dataset_dir: str, fix: str) -> None:
    """Checks a prepared dataset's files against its dataset_info.json (every shard present,
    readable, with the record count written there); `fix` says how to repair it."""
    info_path = os.path.join(dataset_dir, "dataset_info.json")
    try:
        with open(info_path) as file:
            info = json.load(file)
    except (OSError, ValueError) as error:
        raise DatasetDamaged(
            f"dataset {name}: {info_path} cannot be read ({error.__class__.__name__}): the"
            f" dataset was not prepared completely; {fix}"
        ) from None
    for split in info.get("splits", []):
        lengths = [int(length) for length in split["shardLengths"]]
        for shard, length in enumerate(lengths):
            path = os.path.join(
                dataset_dir,
                f"{name}-{split['name']}.array_record-{shard:05d}-of-{len(lengths):05d}",
            )
            try:
                found = array_record_module.ArrayRecordReader(path).num_records()
            except (OSError, RuntimeError, ValueError) as error:
                raise DatasetDamaged(
                    f"dataset file {path} is damaged or missing ({error}); {fix}"
                ) from None
            if found != length:
                raise DatasetDamaged(
                    f"dataset file {path} holds {found} records, not the {length} of"
                    f" dataset_info.json; {fix}"
                )


def _load_builtin(name: str, data_dir: str) -> Dataset:
    builder = _prepared_builtin(name, data_dir)
    splits = {}
    for split in ("train", "test"):
        source = tfds.data_source(name, split=split, data_dir=data_dir)
        records = [source[i] for i in range(len(source))]
        splits[split] = ArraySplit(
            np.stack([record["image"] for record in records]),
            np.asarray([record["label"] for record in records], np.int32),
        )
    image = builder.info.features["image"]
    return Dataset(
        name=name,
        train=splits["train"],
        test=splits["test"],
        num_classes=builder.info.features["label"].num_classes,
        input_shape=tuple(image.shape),
        input_dtype=np.dtype(image.np_dtype),
        max_value=builder.MAX_VALUE,
    )


def _load_tfds(name: str, data_dir: str, image_size: int | None) -> Dataset:
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if os.path.isdir(builder.data_dir):
            fix = f"remove {builder.data_dir} and run: {prepare_command(name, data_dir)}"
            verify_files(name, str(builder.data_dir), fix)
        train, test = (
            _source_split(name, split, data_dir, image_size) for split in ("train", "test")
        )
    except tfds.core.registered.DatasetNotFoundError:
        known = sorted({*BUILTIN_BUILDERS, *tfds.list_builders(with_community_datasets=False)})
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise DatasetNotPrepared(
            f"dataset.name={name!r} is neither a built-in dataset {sorted(BUILTIN_BUILDERS)} nor"
            f" a TFDS dataset; {hint}set --config.dataset.name"
        ) from None
    except (
        FileNotFoundError,
        AssertionError,
        NotImplementedError,
        ValueError,
    ) as error:
        raise DatasetNotPrepared(
            f"dataset.name={name!r} is not prepared as array_record in {data_dir} "
            f"({type(error).__name__}); run: {prepare_command(name, data_dir)}"
        ) from error
    features = builder.info.features
    image = features["image"]
    dtype = np.dtype(image.np_dtype)
    shape = tuple(image.shape)
    if image_size is not None:
        shape = (image_size, image_size, shape[-1])
    elif None in shape:
        raise DatasetNotPrepared(
            f"dataset.name={name!r} has images of varying size {shape}; set"
            " --config.dataset.image_size (e.g. 224) to resize them"
        )
    return Dataset(
        name=name,
        train=train,
        test=test,
        num_classes=features["label"].num_classes,
        input_shape=shape,
        input_dtype=dtype,
        max_value=float(np.iinfo(dtype).max) if dtype.kind == "u" else 1.0,
        natural_images=image.shape[-1] == 3,
        resizable=True,
    )


def _source_split(name: str, split: str, data_dir: str, image_size: int | None) -> SourceSplit:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    return SourceSplit(source, _read_labels(name, split, data_dir, source), image_size)


def _read_labels(name: str, split: str, data_dir: str, source) -> np.ndarray:
    """All labels of a split, without decoding images where TFDS can (with TensorFlow
    installed); else by decoding every record once."""
    try:
        undecoded = tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        return np.asarray([undecoded[i]["label"] for i in range(len(undecoded))], np.int32)
    except ModuleNotFoundError:
        return np.asarray([source[i]["label"] for i in range(len(source))], np.int32)
