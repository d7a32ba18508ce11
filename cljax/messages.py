"""What a run tells its user when something is wrong: errors, warnings, exit statuses.

Bad input is a `ConfigError` whose message is one line naming the field (or file) and the
fix; a run that starts but cannot go on is a `RunFailed`. Warnings are one line each.
"""

import sys

EXIT_FAILED = 1  # the run started and failed (non-finite loss, damaged data, a bug)
EXIT_BAD_INPUT = 2  # a config field, file or directory that cannot work; nothing ran
EXIT_LOST_PROCESS = 3  # another process of the job died or cannot be reached
EXIT_PREEMPTED = 75  # SIGTERM or SIGUSR1: a checkpoint was saved; run the same command again
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class ConfigError(ValueError):
    """Bad input, found before anything compiles; the message names the field and the fix."""


class RunFailed(RuntimeError):
    """A run that cannot go on; the message says where it stopped and what to do."""


class Preempted(RunFailed):
    """SIGTERM or SIGUSR1 (a scheduler's notice): the run saved a checkpoint and stopped."""


def warn(message: str) -> None:
    """One line on stderr, for input that still makes a run but probably not the one meant."""
    print(f"cljax: warning: {message}", file=sys.stderr, flush=True)
