"""Every error cljax raises, its exit statuses, and its one-line warnings.

Two families, told apart by when they happen:
- `ConfigError`: bad input, found before anything compiles (a config field, a dataset that is
  missing or damaged, a workdir that cannot be used). The message is one line that names the
  field (or file) and the fix. Exit status 2.
- `RunFailed`: a run that started and cannot go on (a non-finite loss, an image that cannot
  be decoded). The message says where it stopped and what to do. Exit status 1, or that of
  its kind (`Preempted` 75, `Interrupted` 130).

Catch `CljaxError` for both.
"""

import errno
import os
import re
import sys

EXIT_FAILED = 1  # the run started and failed (non-finite loss, damaged data, a bug)
EXIT_BAD_INPUT = 2  # a config field, file or directory that cannot work; nothing ran
EXIT_LOST_PROCESS = 3  # another process of the job died or cannot be reached
EXIT_PREEMPTED = 75  # SIGTERM or SIGUSR1: a checkpoint was saved; run the same command again
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class CljaxError(Exception):
    """Any error of cljax's own; its message is one line."""


class ConfigError(CljaxError, ValueError):
    """Bad input, found before anything compiles; the message names the field and the fix."""


class ArgumentError(ConfigError):
    """A component's argument (`model.<name>.*`, `strategy.<name>.*`) that cannot work."""


class DatasetError(ConfigError):
    """A dataset that cannot be read; the message names it (or its file) and the fix."""


class DatasetNotPrepared(DatasetError):
    """A TFDS dataset that is missing from the data dir, or not in array_record format."""


class DatasetDamaged(DatasetError):
    """A prepared dataset whose files are missing, truncated or corrupted."""


class RunFailed(CljaxError, RuntimeError):
    """A run that cannot go on; the message says where it stopped and what to do."""


class Preempted(RunFailed):
    """SIGTERM or SIGUSR1 (a scheduler's notice): the run saved a checkpoint and stopped."""


class Interrupted(RunFailed):
    """Ctrl-C: the run stopped between steps; metrics.json says what finished."""


class DataError(RunFailed):
    """Input the pipeline cannot use during a run (an image that cannot be decoded)."""


class WriteFailed(RunFailed):
    """A file of the run could not be written (a full disk, a quota, a read-only file
    system): what the libraries were writing in the background is abandoned."""


class UndecodableImage(ValueError):
    """Bytes that are not an image the decoders can read (the input pipeline names the file
    and applies `dataset.bad_images`)."""


# Failures to write that no retry fixes (a full disk, a quota, a read-only file system, a
# file-size limit), and how TensorStore (Orbax's writer) words them.
WRITE_FAILURES = {
    errno.ENOSPC: "No space left on device",
    errno.EDQUOT: "Disk quota exceeded",
    errno.EROFS: "Read-only file system",
    errno.EFBIG: "File too large",
}
# What a file of a run's directory is, by the first part of its path in the directory.
WRITTEN = {
    "checkpoints": "a checkpoint",
    "metrics.json": "metrics.json",
    "plots": "the plots",
    "tensorboard": "the TensorBoard events",
    "final_model": "the final model",
    "wandb": "the W&B run",
}


def write_failure(error: BaseException, workdir: str) -> WriteFailed | None:
    """One line for a failure to write into `workdir` (a full disk, a quota, a read-only
    file system) found anywhere in `error`'s chain, naming the path and what was being
    written; None for any other error."""
    while error is not None:
        reason = _reason(error)
        if reason is not None:
            path = getattr(error, "filename", None) or _quoted_path(str(error)) or workdir
            relative = os.path.relpath(os.path.abspath(path), os.path.abspath(workdir))
            what = WRITTEN.get(relative.split(os.sep)[0], "a file")
            return WriteFailed(
                f"cannot write {what} at {path} ({reason}); free space there and run the same"
                " command again: it resumes from the last complete checkpoint"
            )
        error = error.__cause__ or error.__context__
    return None


def _reason(error: BaseException) -> str | None:
    if isinstance(error, OSError) and error.errno in WRITE_FAILURES:
        return WRITE_FAILURES[error.errno]
    return next((text for text in WRITE_FAILURES.values() if text in str(error)), None)


def _quoted_path(message: str) -> str | None:
    """The last absolute path quoted in `message` (TensorStore names the file it failed)."""
    paths = re.findall(r'"(/[^"]+)"', message)
    return paths[-1] if paths else None


def exit_status(error: BaseException) -> int:
    """The process's exit status for a run that ended with `error`."""
    if isinstance(error, ConfigError):
        return EXIT_BAD_INPUT
    if isinstance(error, Preempted):
        return EXIT_PREEMPTED
    if isinstance(error, Interrupted | KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILED


def warn(message: str) -> None:
    """One line on stderr, for input that still makes a run but probably not the one meant."""
    print(f"cljax: warning: {message}", file=sys.stderr, flush=True)
