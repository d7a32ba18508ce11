"""Synthetic image datasets in the on-disk forms of real ones, for tests and benchmarks.

    python -m cljax.data.synthetic tfds --name=synthetic_imagenet --data_dir=DIR [options]
    python -m cljax.data.synthetic imagefolder --out=DIR [options]

`tfds` writes a TFDS dataset in array_record format whose `image` feature holds JPEG bytes,
as imagenet2012's does (no TensorFlow needed); cljax then reads it by name like any
prepared TFDS dataset. `imagefolder` writes the ImageNet layout, `DIR/train/<class>/*.JPEG`
and `DIR/val/<class>/*.JPEG`. Every image has its own size (sides drawn in
[min_size, max_size]) and a learnable class signal: each class has its own hue and stripe
frequency, under noise and a random brightness, so that a small network learns the classes
in a few epochs. The same seed writes the same files.
"""

import colorsys
import dataclasses
import io
import os
import sys
import types

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from PIL import Image


@dataclasses.dataclass(frozen=True)
class Spec:
    """What to write: classes, images per class and split, image sides, seed."""

    num_classes: int = 10
    train_per_class: int = 20
    test_per_class: int = 5
    min_size: int = 300
    max_size: int = 500
    seed: int = 0

    @property
    def per_class(self) -> dict[str, int]:
        return {"train": self.train_per_class, "test": self.test_per_class}


def make_image(
    label: int, num_classes: int, rng: np.random.Generator, min_size: int, max_size: int
):
    """One uint8 HWC image of class `label`."""
    height, width = rng.integers(min_size, max_size + 1, size=2)
    red, green, blue = colorsys.hsv_to_rgb(label / num_classes, 0.8, 0.9)
    colour = np.array([red, green, blue]) * 255
    frequency = 2 + 3 * (label % 5)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (x + 0.3 * y) + rng.uniform(0, 2 * np.pi))
    brightness = rng.uniform(0.6, 1.0)
    image = colour * (0.4 + 0.6 * stripes[..., None]) * brightness
    image += rng.normal(0, 20, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _examples(split: str, spec: Spec):
    """(index, label, image) of a split, in a fixed order seeded by (seed, split)."""
    rng = np.random.default_rng([spec.seed, list(spec.per_class).index(split)])
    for index in range(spec.num_classes * spec.per_class[split]):
        label = index % spec.num_classes
        yield index, label, make_image(label, spec.num_classes, rng, spec.min_size, spec.max_size)


def write_tfds(name: str, data_dir: str, spec: Spec = Spec()) -> str:
    """Writes the TFDS dataset `name` into `data_dir`; returns its directory."""
    side = spec.min_size if spec.min_size == spec.max_size else None
    shape = (side, side, 3)  # fixed when every image has one size, as cifar10's

    def body(namespace):
        namespace.update(
            name=name,
            VERSION=tfds.core.Version("1.0.0"),
            RELEASE_NOTES={"1.0.0": "Synthetic images written by cljax.data.synthetic."},
            _info=lambda self: tfds.core.DatasetInfo(
                builder=self,
                description=f"cljax synthetic images: {spec}.",
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=shape, encoding_format="jpeg"),
                        "label": tfds.features.ClassLabel(num_classes=spec.num_classes),
                    }
                ),
                supervised_keys=("image", "label"),
            ),
            _split_generators=lambda self, dl_manager: {
                split: self._generate_examples(split) for split in spec.per_class
            },
            _generate_examples=lambda self, split: (
                (index, {"image": io.BytesIO(jpeg(image)), "label": label})
                for index, label, image in _examples(split, spec)
            ),
        )

    builder_class = types.new_class(
        "SyntheticImages",
        (tfds.core.GeneratorBasedBuilder,),
        {"skip_registration": True},
        body,
    )
    builder = builder_class(data_dir=data_dir, file_format="array_record")
    tfds.disable_progress_bar()
    builder.download_and_prepare(file_format="array_record")
    return str(builder.data_dir)


def write_imagefolder(out: str, spec: Spec = Spec()) -> str:
    """Writes `out/train/<class>/*.JPEG` and `out/val/<class>/*.JPEG`; returns `out`."""
    for split in spec.per_class:
        folder = "train" if split == "train" else "val"
        for label in range(spec.num_classes):
            os.makedirs(os.path.join(out, folder, f"class_{label:04d}"), exist_ok=True)
        for index, label, image in _examples(split, spec):
            path = os.path.join(out, folder, f"class_{label:04d}", f"{split}_{index:08d}.JPEG")
            with open(path, "wb") as file:
                file.write(jpeg(image))
    return out


_NAME = flags.DEFINE_string("name", "synthetic_imagenet", "TFDS dataset name (tfds).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (tfds; default $TFDS_DATA_DIR).")
_OUT = flags.DEFINE_string("out", None, "Folder to write (imagefolder).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes.")
_TRAIN = flags.DEFINE_integer("train_per_class", 20, "Training images per class.")
_TEST = flags.DEFINE_integer("test_per_class", 5, "Test (val) images per class.")
_MIN_SIZE = flags.DEFINE_integer("min_size", 300, "Smallest image side.")
_MAX_SIZE = flags.DEFINE_integer("max_size", 500, "Largest image side.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed: the same seed writes the same files.")


def main(argv: list[str]) -> None:
    formats = ("tfds", "imagefolder")
    if len(argv) != 2 or argv[1] not in formats:
        sys.exit(f"usage: python -m cljax.data.synthetic {{{'|'.join(formats)}}} [flags]")
    spec = Spec(
        _NUM_CLASSES.value,
        _TRAIN.value,
        _TEST.value,
        _MIN_SIZE.value,
        _MAX_SIZE.value,
        _SEED.value,
    )
    if argv[1] == "tfds":
        from cljax.data.sources import resolve_data_dir

        written = write_tfds(_NAME.value, resolve_data_dir(_DATA_DIR.value), spec)
    else:
        if not _OUT.value:
            sys.exit("cljax: imagefolder needs --out=DIR")
        written = write_imagefolder(_OUT.value, spec)
    print(f"Wrote {written}")


if __name__ == "__main__":
    app.run(main)
