"""Datasets by name, read from TFDS array_record files with `tfds.data_source`.

The registry holds cljax's own datasets: `digits` and `mnist1d` (TFDS builders inside
cljax, built into the data dir on first use with no download) and `imagefolder`; `@register(
NAME)` adds a loader `(data_dir, image_size, path) -> Dataset` from the user's own code. Any
other name is a TFDS image-classification
dataset (`image` and `label` features) that must already be prepared in array_record
format (`python -m cljax.data.prepare NAME`). Small built-in datasets are held in memory,
and so are TFDS datasets of fixed-size images that are not natural (RGB) images, such as
MNIST, up to `IN_MEMORY_BYTES` decoded: decoded once, cached, and read back in a fraction of
a second, so that a step of a tiny model never waits for PNG decoding. Other TFDS datasets
(natural images, which the host may crop, or larger ones) are read batch by batch, and only
their labels are read up front.
"""

import contextlib
import dataclasses
import difflib
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from cljax.data import cache, imagefolder
from cljax.data.digits import Digits
from cljax.data.mnist1d import Mnist1d
from cljax.data.transforms import decode
from cljax.errors import DatasetDamaged, DatasetError, DatasetNotPrepared, UndecodableImage
from cljax.registry import Registry

BUILTIN_BUILDERS = {"digits": Digits, "mnist1d": Mnist1d}
IN_MEMORY_BYTES = 1 << 30
DEFAULT_DATA_DIR = os.path.join("~", "tensorflow_datasets")


class Split(Protocol):
    """One split: all labels in memory, each sample read on demand as an `example`: an
    array in its stored dtype, or an image's encoded bytes (JPEG, PNG) to decode."""

    labels: np.ndarray

    def __len__(self) -> int: ...

    def example(self, row: int) -> np.ndarray | bytes: ...

    def describe(self, row: int) -> str:
        """Where sample `row` comes from, for error messages."""


@dataclasses.dataclass(frozen=True)
class ArraySplit:
    """A split held in host memory."""

    inputs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def example(self, row: int) -> np.ndarray:
        return self.inputs[row]

    def describe(self, row: int) -> str:
        return f"row {row}"


@dataclasses.dataclass(frozen=True)
class RecordSplit:
    """A split read record by record from a TFDS data source (random access), its images
    left encoded: decoding belongs to the input pipeline."""

    source: Sequence[dict]
    labels: np.ndarray
    name: str = ""
    split: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def example(self, row: int) -> bytes:
        return self.source[row]["image"]

    def describe(self, row: int) -> str:
        return f"record {row} of {self.name}"


# Per-channel mean and standard deviation of inputs scaled to [0, 1], by dataset.
IMAGENET_STATISTICS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STATISTICS = {
    "imagenet2012": IMAGENET_STATISTICS,
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test splits plus what the model, the buffer and the input pipeline need
    to know about them.

    `input_shape` is the shape a sample reaches the model with (after resizing to
    `image_size`); `encoded`: examples are encoded images to decode; `mean` and `std`:
    per-channel statistics of inputs scaled to [0, 1] (ImageNet's for natural images without
    statistics of their own; 0 and 1 otherwise).
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    max_value: float
    natural_images: bool = False
    resizable: bool = False
    encoded: bool = False
    image_size: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


def resolve_data_dir(data_dir: str | None) -> str:
    """`data_dir`, else $TFDS_DATA_DIR, else TFDS's default."""
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or DEFAULT_DATA_DIR)


def prepare_command(name: str, data_dir: str) -> str:
    return f"python -m cljax.data.prepare {name} --data_dir={data_dir}"


DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset", "dataset.name")
register = DATASETS.register


def load(
    name: str,
    data_dir: str | None = None,
    image_size: int | None = None,
    path: str | None = None,
) -> Dataset:
    """Loads dataset `name`: a registered one (a built-in one is built first if missing;
    `imagefolder` reads the folder at `path`) or a prepared TFDS dataset in `data_dir`.

    `image_size` resizes images to squares of that size.
    """
    if name in DATASETS:
        return DATASETS[name](data_dir=data_dir, image_size=image_size, path=path)
    return _load_tfds(name, resolve_data_dir(data_dir), image_size)


@register("imagefolder")
def _imagefolder(data_dir: str | None, image_size: int | None, path: str | None) -> Dataset:
    if path is None:
        raise DatasetError(
            "dataset.name='imagefolder' needs dataset.path; set --config.dataset.path to a"
            " folder holding train/<class>/ and val/<class>/"
        )
    train, test, classes = imagefolder.load(path)
    return image_dataset("imagefolder", train, test, len(classes), (None, None, 3), image_size)


def _builtin_loader(name: str) -> Callable[..., Dataset]:
    def load_builtin(data_dir: str | None, image_size: int | None, path: str | None) -> Dataset:
        return _load_builtin(name, resolve_data_dir(data_dir))

    return load_builtin


for _name in BUILTIN_BUILDERS:
    register(_name)(_builtin_loader(_name))


def _prepared_builtin(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """The builder of built-in dataset `name`, built into `data_dir` if it was not there."""
    builder = BUILTIN_BUILDERS[name](data_dir=data_dir, file_format="array_record")
    if not os.path.exists(builder.data_dir):
        print(f"Building dataset {name} into {builder.data_dir}", flush=True)
        tfds.disable_progress_bar()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints two lines of its own
                builder.download_and_prepare()
        except OSError as error:
            if os.path.exists(builder.data_dir):  # another run built it at the same time
                return _prepared_builtin(name, data_dir)
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
        test_split = "test" if "test" in builder.info.splits else "validation"
        train, test = (
            _record_split(name, split, data_dir, str(builder.data_dir))
            for split in ("train", test_split)
        )
    except tfds.core.registered.DatasetNotFoundError:
        known = sorted({*DATASETS, *tfds.list_builders(with_community_datasets=False)})
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise DatasetNotPrepared(
            f"dataset.name={name!r} is neither a registered dataset {DATASETS.names()} nor"
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
    dataset = image_dataset(
        name, train, test, features["label"].num_classes, tuple(image.shape), image_size
    )
    decoded_bytes = (len(train) + len(test)) * math.prod(dataset.input_shape)
    if dataset.natural_images or image_size is not None or decoded_bytes > IN_MEMORY_BYTES:
        return dataset
    try:
        splits = [
            _decoded(split, name, str(builder.data_dir), dataset.input_shape)
            for split in (train, test)
        ]
    except UndecodableImage:
        return dataset  # read batch by batch, where dataset.bad_images says what to do
    return dataclasses.replace(dataset, train=splits[0], test=splits[1], encoded=False)


def _decoded(split: RecordSplit, name: str, dataset_dir: str, shape: tuple) -> ArraySplit:
    """Every image of `split` decoded into memory, from the cache after the first time."""
    shards = _shards(dataset_dir, name, split.split)

    def decode_all() -> dict[str, np.ndarray]:
        inputs = np.empty((len(split), *shape), np.uint8)
        for row in range(len(split)):
            inputs[row] = decode(split.example(row), shape[-1]).reshape(shape)
        return {"inputs": inputs}

    key = f"{os.path.abspath(dataset_dir)}:{split.split}"
    inputs = cache.cached("tfds-images", key, cache.signature(shards), decode_all)["inputs"]
    return ArraySplit(inputs, split.labels)


def image_dataset(
    name: str,
    train: Split,
    test: Split,
    num_classes: int,
    stored_shape: tuple,
    image_size: int | None,
) -> Dataset:
    """A dataset of encoded uint8 images, resized to `image_size` if given (required when
    `stored_shape` has unknown (None) sides)."""
    channels = stored_shape[-1] or 3
    if image_size is not None:
        shape = (image_size, image_size, channels)
    elif None in stored_shape:
        raise DatasetNotPrepared(
            f"dataset.name={name!r} has images of varying size {stored_shape}; set"
            " --config.dataset.image_size (e.g. 224) to resize them"
        )
    else:
        shape = tuple(stored_shape)
    natural = channels == 3
    mean, std = STATISTICS.get(name, IMAGENET_STATISTICS if natural else ((0.0,), (1.0,)))
    return Dataset(
        name=name,
        train=train,
        test=test,
        num_classes=num_classes,
        input_shape=shape,
        input_dtype=np.dtype(np.uint8),
        max_value=255.0,
        natural_images=natural,
        resizable=True,
        encoded=True,
        image_size=image_size,
        mean=mean,
        std=std,
    )


def _record_split(name: str, split: str, data_dir: str, dataset_dir: str) -> RecordSplit:
    """A TFDS split whose records keep their images encoded; its labels read once without
    decoding a single image, then cached (keyed by its shard files)."""
    source = tfds.data_source(
        name,
        split=split,
        data_dir=data_dir,
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    shards = _shards(dataset_dir, name, split)
    labels = cache.cached(
        "tfds-labels",
        f"{os.path.abspath(dataset_dir)}:{split}",
        cache.signature(shards),
        lambda: {"labels": np.asarray([source[i]["label"] for i in range(len(source))], np.int32)},
    )["labels"]
    return RecordSplit(source, labels, f"{name} {split}", split)


def _shards(dataset_dir: str, name: str, split: str) -> list[str]:
    """The array_record shard files of `split` in dataset `name`'s prepared directory."""
    return sorted(
        os.path.join(dataset_dir, file)
        for file in os.listdir(dataset_dir)
        if file.startswith(f"{name}-{split}.array_record")
    )
