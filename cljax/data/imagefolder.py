"""Image folders in ImageNet's layout: `PATH/train/<class>/*` and `PATH/val/<class>/*`.

Classes are the sorted names of `train/`'s subfolders (label i is the i-th); the test split
is `val/` (or `validation/`, `test/`), whose subfolders must be among `train/`'s (ImageNet's
validation images sorted into class folders, as the usual preparation script does). Files
are listed once and the index (files and labels) cached (`cljax.data.cache`) under the
signature of every folder's modification time, so a later start reads it back.
"""

import dataclasses
import os

import numpy as np

from cljax.data import cache
from cljax.errors import DatasetError, warn

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TEST_FOLDERS = ("val", "validation", "test")


@dataclasses.dataclass(frozen=True)
class FileSplit:
    """A split of image files: `root/files[i]`, of class `labels[i]`."""

    root: str
    files: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def example(self, row: int) -> bytes:
        with open(self.describe(row), "rb") as file:
            return file.read()

    def describe(self, row: int) -> str:
        return os.path.join(self.root, str(self.files[row]))


def load(path: str) -> tuple[FileSplit, FileSplit, list[str]]:
    """The train and test splits of the image folder at `path`, and its class names."""
    if not os.path.isdir(path):
        raise DatasetError(
            f"dataset.path={path} is not a folder; set --config.dataset.path to a folder"
            " holding train/<class>/ and val/<class>/"
        )
    train = os.path.join(path, "train")
    test = next(
        (os.path.join(path, n) for n in TEST_FOLDERS if os.path.isdir(os.path.join(path, n))), None
    )
    if not os.path.isdir(train) or test is None:
        raise DatasetError(
            f"dataset.path={path} needs a train/ and a val/ folder of class folders (ImageNet's"
            f" layout); it holds {sorted(os.listdir(path))[:10]}"
        )
    folders = [path, train, test, *_subfolders(train), *_subfolders(test)]
    index = cache.cached(
        "imagefolder", os.path.abspath(path), cache.signature(folders), lambda: _scan(train, test)
    )
    classes = [str(name) for name in index["classes"]]
    unreadable = index["unreadable"]
    if len(unreadable):
        warn(
            f"{len(unreadable)} entries of {path} cannot be read (a symbolic link in a loop or"
            f" to nowhere, no permission) and were left out, e.g. {unreadable[0]}"
        )
    return (
        FileSplit(train, index["train_files"], index["train_labels"]),
        FileSplit(test, index["test_files"], index["test_labels"]),
        classes,
    )


def _subfolders(folder: str, unreadable: list[str] | None = None) -> list[str]:
    return sorted(entry.path for entry in _entries(folder, unreadable) if entry.is_dir())


def _images(folder: str, unreadable: list[str]) -> list[str]:
    return sorted(
        entry.name
        for entry in _entries(folder, unreadable)
        if entry.is_file() and entry.name.lower().endswith(EXTENSIONS)
    )


def _entries(folder: str, unreadable: list[str] | None) -> list[os.DirEntry]:
    """The entries of `folder` that can be read; the paths of the others (a symbolic link
    in a loop or to nowhere readable, an entry without permission) go to `unreadable`."""
    readable = []
    for entry in os.scandir(folder):
        try:
            entry.is_dir()
            entry.is_file()
            if entry.is_symlink():
                os.stat(entry.path)
        except OSError:
            if unreadable is not None:
                unreadable.append(entry.path)
            continue
        readable.append(entry)
    return readable


def _scan(train: str, test: str) -> cache.Arrays:
    """Files and labels of both splits (every class folder of train/ must hold images)."""
    classes = [os.path.basename(folder) for folder in _subfolders(train)]
    if not classes:
        raise DatasetError(
            f"{train} holds no class folders; put each class's images in train/<class>/"
        )
    label_of = {name: label for label, name in enumerate(classes)}
    index = {"classes": np.asarray(classes)}
    unreadable: list[str] = []
    for split, root in (("train", train), ("test", test)):
        files, labels = [], []
        for folder in _subfolders(root, unreadable):
            name = os.path.basename(folder)
            if name not in label_of:
                raise DatasetError(
                    f"{folder} is not one of train/'s {len(classes)} class folders; remove it or"
                    " add the class to train/"
                )
            images = _images(folder, unreadable)
            if not images and split == "train":
                raise DatasetError(
                    f"{folder} holds no images ({', '.join(EXTENSIONS)}); remove the folder or"
                    " add its images"
                )
            files.extend(os.path.join(name, image) for image in images)
            labels.extend([label_of[name]] * len(images))
        index[f"{split}_files"] = np.asarray(files)
        index[f"{split}_labels"] = np.asarray(labels, np.int32)
    index["unreadable"] = np.asarray(unreadable, dtype=str)
    return index
