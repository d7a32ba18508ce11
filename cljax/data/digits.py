"""TFDS builder for scikit-learn's bundled 8x8 digits: no download, no TensorFlow.

Pixels are intensities 0..16 stored as uint8; the train/test split is stratified by class
with a fixed seed, so every build of the dataset is identical.
"""

from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

TEST_FRACTION = 0.2
SPLIT_SEED = 0


class Digits(tfds.core.GeneratorBasedBuilder):
    """sklearn digits as a TFDS dataset with `image` (8, 8, 1) uint8 and `label` features."""

    VERSION = tfds.core.Version("1.0.0")
    MAX_VALUE = 16.0
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Stratified 80/20 split of sklearn's digits, seed 0."
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's 1,797 8x8 handwritten digits, intensities 0..16.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        # scikit-learn takes a second to import: only a build of the dataset needs it.
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        ids = np.arange(len(digits.target))
        train_ids, test_ids = train_test_split(
            ids, test_size=TEST_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
        )
        return {
            "train": self._generate_examples(digits, np.sort(train_ids)),
            "test": self._generate_examples(digits, np.sort(test_ids)),
        }

    def _generate_examples(self, digits, ids):
        for i in ids:
            image = digits.images[i].astype(np.uint8)[..., None]
            yield int(i), {"image": image, "label": int(digits.target[i])}
