"""Command-line entry: `python -m cljax.train [--config=NAME[:ARG]] [--workdir=DIR]`.

`--config` names a config that ships with cljax (`configs/NAME.py`) or any `PATH.py`, with
an optional ARG for its `get_config`; `--config.FIELD=VALUE` overrides any field, and
`--helpconfig` lists them all. With no flags, runs the default experiment
(configs/default.py) into a fresh directory under `runs/`. Bad input stops before anything
compiles, with one line that names the field and the fix. Exit statuses (`cljax.errors`):
0 finished, 1 failed, 2 bad input, 3 another process lost, 75 preempted (SIGTERM or
SIGUSR1: a checkpoint was saved; rerun the same command), 130 interrupted (Ctrl-C).
"""

import logging as logging_module
import os
import signal
import sys

import jax
from absl import app, flags, logging

from cljax import configuration, errors, trainer

COMPILATION_CACHE = os.path.join("~", ".cache", "cljax", "jax")
OVERRIDE_PREFIX = "--config."

_CONFIG = flags.DEFINE_string(
    "config", "default", "Config: NAME[:ARG] for configs/NAME.py, or PATH.py[:ARG]."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for metrics.json; default: a fresh one under runs/."
)
_HELPCONFIG = flags.DEFINE_bool(
    "helpconfig", False, "List every field of the config with its value and meaning, and exit."
)


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """`argv` without its `--config.FIELD=VALUE` arguments, and those as {FIELD: VALUE}."""
    rest, overrides = [], {}
    for arg in argv:
        if arg.startswith(OVERRIDE_PREFIX):
            field, equals, value = arg.removeprefix(OVERRIDE_PREFIX).partition("=")
            if not equals:
                _stop(f"{arg} has no value; write {arg}=VALUE", errors.EXIT_BAD_INPUT)
            if field in overrides:
                _stop(
                    f"--config.{field} is given twice ({overrides[field]!r}, then {value!r});"
                    " give it once",
                    errors.EXIT_BAD_INPUT,
                )
            overrides[field] = value
        else:
            rest.append(arg)
    return rest, overrides


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one line instead of a usage dump on a bad flag."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _stop(f"{error}; see --helpfull for the flags", errors.EXIT_BAD_INPUT)


def _stop(message: str, status: int) -> None:
    print(f"cljax: {message}", file=sys.stderr, flush=True)
    if status:
        # What libraries left half done (Orbax's writes after a full disk) may complain while
        # Python shuts down; the one line above says what happened.
        sys.unraisablehook = lambda unraisable: None
    sys.exit(status)


def _preempted_before_training(signum: int, frame) -> None:
    """SIGTERM or SIGUSR1 before the training loop took them over: nothing to save."""
    raise errors.Preempted(
        f"{signal.Signals(signum).name} before the first training step: nothing was saved;"
        " run the same command to start again"
    )


def _report_unraisable(unraisable) -> None:
    """`sys.unraisablehook`, but quiet about what Orbax's writes in flight report once its
    event loop has closed after a failed save (the run's one line says what failed)."""
    if isinstance(unraisable.exc_value, RuntimeError) and (
        str(unraisable.exc_value) == "Event loop is closed"
    ):
        return
    sys.__unraisablehook__(unraisable)


class _QuietLibraries(logging_module.Filter):
    """Keeps Orbax's own log lines out of a run's output (below --verbosity=0): the errors
    they repeat reach the user as cljax's one line."""

    def filter(self, record: logging_module.LogRecord) -> bool:
        return f"{os.sep}orbax{os.sep}" not in record.pathname


def run(overrides: dict[str, str], argv: list[str]) -> None:
    """Loads the config, applies the overrides and trains; maps failures to one line."""
    if len(argv) > 1:
        _stop(f"unexpected arguments {' '.join(argv[1:])}", errors.EXIT_BAD_INPUT)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        logging.get_absl_handler().addFilter(_QuietLibraries())
    sys.unraisablehook = _report_unraisable
    for preemption_signal in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(preemption_signal, _preempted_before_training)
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(COMPILATION_CACHE))
        # Every program, however quick to compile: a small model's run compiles a dozen of
        # 0.05 to 0.2 s each, which JAX by default (under 1 s) compiles again every time.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        config = configuration.load_config(_CONFIG.value)
        configuration.apply_overrides(config, overrides)
        if _HELPCONFIG.value:
            print(configuration.fields_table(config))
            return
        trainer.train_and_evaluate(config, _WORKDIR.value)
    except errors.WriteFailed as error:
        # Orbax's writes in flight would fail again, loudly, while Python shuts down.
        print(f"cljax: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(errors.EXIT_FAILED)
    except errors.CljaxError as error:
        _stop(str(error), errors.exit_status(error))
    except KeyboardInterrupt:
        _stop("interrupted before training started", errors.EXIT_INTERRUPTED)


def main() -> None:
    argv, overrides = split_overrides(sys.argv)
    app.run(lambda args: run(overrides, args), argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    main()
