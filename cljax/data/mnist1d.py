"""TFDS builder for MNIST-1D, generated offline with the `mnist1d` package's generator.

10,000 one-dimensional signals of 40 float32 values (stored as `image`, shape (40, 1)),
10 classes, split 80/20 by the generator itself with its fixed seed. Nothing is
downloaded: `make_dataset` synthesises the signals from the digit templates.
"""

from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

NUM_SAMPLES = 10_000
SEQUENCE_LENGTH = 40


class Mnist1d(tfds.core.GeneratorBasedBuilder):
    """MNIST-1D as a TFDS dataset with `image` (40, 1) float32 and `label` features."""

    VERSION = tfds.core.Version("1.0.0")
    MAX_VALUE = 1.0
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "10,000 samples from mnist1d's generator with its default arguments."
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="MNIST-1D (Greydanus 2020): 40-step 1-D signals of 10 digit templates.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(SEQUENCE_LENGTH, 1), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = NUM_SAMPLES
        data = make_dataset(args)
        return {
            "train": self._generate_examples(data["x"], data["y"]),
            "test": self._generate_examples(data["x_test"], data["y_test"]),
        }

    def _generate_examples(self, signals, labels):
        for index, (signal, label) in enumerate(zip(signals, labels, strict=True)):
            yield index, {"image": signal.astype(np.float32)[:, None], "label": int(label)}
