"""Prepares a TFDS dataset in array_record format, the format cljax reads.

    python -m cljax.data.prepare NAME [--data_dir=DIR]
    python -m cljax.data.prepare mnist --from_dir=DIR [--data_dir=...]

Runs TFDS's `download_and_prepare` with `file_format='array_record'` (this downloads the
dataset's source files, so it needs network access; some datasets ask for a manual
download first, which TFDS explains). cljax's built-in datasets (`digits`, `mnist1d`) are
built the same way, with no download. `mnist --from_dir` writes TFDS's `mnist` from the four
standard IDX files already on disk (`cljax/data/mnist.py`), with no download and no
TensorFlow.
"""

import sys

import tensorflow_datasets as tfds
from absl import app, flags, logging

from cljax.data import mnist, sources
from cljax.errors import EXIT_BAD_INPUT, DatasetError

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR).")
_FROM_DIR = flags.DEFINE_string(
    "from_dir", None, "mnist only: the folder of MNIST's four IDX files (.gz or not)."
)


def prepare(name: str, data_dir: str | None = None, from_dir: str | None = None) -> str:
    """Builds `name` into `data_dir` as array_record (from the files in `from_dir`, for
    mnist); returns the dataset's directory."""
    data_dir = sources.resolve_data_dir(data_dir)
    if from_dir is not None:
        if name != "mnist":
            raise DatasetError(f"--from_dir reads MNIST's IDX files; it does not apply to {name}")
        return mnist.prepare(from_dir, data_dir)
    builder_class = sources.BUILTIN_BUILDERS.get(name)
    if builder_class is not None:
        builder = builder_class(data_dir=data_dir, file_format="array_record")
    else:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    return str(builder.data_dir)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m cljax.data.prepare NAME [--data_dir=DIR] [--from_dir=DIR]")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TFDS logs every shard it writes at INFO
    try:
        path = prepare(argv[1], _DATA_DIR.value, _FROM_DIR.value)
    except DatasetError as error:
        print(f"cljax: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    print(f"Prepared {argv[1]} in {path}")


if __name__ == "__main__":
    app.run(main)
