"""Command-line entry: `python -m cljax.train [--config=configs/NAME.py[:ARG]] [--workdir=DIR]`.

Config fields can be overridden with `--config.FIELD=VALUE`. With no flags, runs the
default experiment (configs/default.py) into a fresh directory under `runs/`.
"""

import datetime
import os
import pathlib
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from cljax import configuration, trainer

COMPILATION_CACHE = os.path.join("~", ".cache", "cljax", "jax")
DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(DEFAULT_CONFIG), "Experiment config file, optionally with :ARG."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for metrics.json; default: a fresh one under runs/."
)


def default_workdir(config) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{config.dataset.name}-{config.strategy.name}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(COMPILATION_CACHE))
    try:
        configuration.validate(config)
        trainer.train_and_evaluate(config, _WORKDIR.value or default_workdir(config))
    except configuration.ConfigError as error:
        sys.exit(f"cljax: {error}")


if __name__ == "__main__":
    app.run(main)
