"""Command-line entry: `python -m cljax.train [--config=NAME[:ARG]] [--workdir=DIR]`.

`--config` names `configs/NAME.py` of this clone (or any `PATH.py`), with an optional ARG
for its `get_config`; `--config.FIELD=VALUE` overrides any field. With no flags, runs the
default experiment (configs/default.py) into a fresh directory under `runs/`. Bad input
stops before anything compiles, with one line that names the field and the fix.
"""

import datetime
import os
import sys

import jax
from absl import app, flags, logging

from cljax import configuration, trainer

COMPILATION_CACHE = os.path.join("~", ".cache", "cljax", "jax")
OVERRIDE_PREFIX = "--config."

_CONFIG = flags.DEFINE_string(
    "config", "default", "Config: NAME[:ARG] for configs/NAME.py, or PATH.py[:ARG]."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for metrics.json; default: a fresh one under runs/."
)


def default_workdir(config) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{config.dataset.name}-{config.strategy.name}")


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """`argv` without its `--config.FIELD=VALUE` arguments, and those as {FIELD: VALUE}."""
    rest, overrides = [], {}
    for arg in argv:
        if arg.startswith(OVERRIDE_PREFIX):
            field, equals, value = arg.removeprefix(OVERRIDE_PREFIX).partition("=")
            if not equals:
                sys.exit(f"cljax: {arg} has no value; write {arg}=VALUE")
            overrides[field] = value
        else:
            rest.append(arg)
    return rest, overrides


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one line instead of a usage dump on a bad flag."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"cljax: {error}; see --helpfull for the flags")


def run(overrides: dict[str, str], argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(COMPILATION_CACHE))
    try:
        config = configuration.load_config(_CONFIG.value)
        configuration.apply_overrides(config, overrides)
        configuration.validate(config)
        trainer.train_and_evaluate(config, _WORKDIR.value or default_workdir(config))
    except configuration.ConfigError as error:
        sys.exit(f"cljax: {error}")


def main() -> None:
    argv, overrides = split_overrides(sys.argv)
    app.run(lambda args: run(overrides, args), argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    main()
