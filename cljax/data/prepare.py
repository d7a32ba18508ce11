"""Prepares a TFDS dataset in array_record format, the format cljax reads.

    python -m cljax.data.prepare NAME [--data_dir=DIR]

Runs TFDS's `download_and_prepare` with `file_format='array_record'` (this downloads the
dataset's source files, so it needs network access; some datasets ask for a manual
download first, which TFDS explains). cljax's built-in datasets (`digits`, `mnist1d`) are
built the same way, with no download.
"""

import sys

import tensorflow_datasets as tfds
from absl import app, flags

from cljax.data import sources

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR).")


def prepare(name: str, data_dir: str | None = None) -> str:
    """Builds `name` into `data_dir` as array_record; returns the dataset's directory."""
    data_dir = sources.resolve_data_dir(data_dir)
    builder_class = sources.BUILTIN_BUILDERS.get(name)
    if builder_class is not None:
        builder = builder_class(data_dir=data_dir, file_format="array_record")
    else:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    return str(builder.data_dir)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m cljax.data.prepare NAME [--data_dir=DIR]")
    print(f"Prepared {argv[1]} in {prepare(argv[1], _DATA_DIR.value)}")


if __name__ == "__main__":
    app.run(main)
