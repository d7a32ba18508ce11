"""A run's directory: one run at a time, never another run's results, standard JSON only.

`Workdir.open` creates the directory (or checks the one given), proves it writable and
takes an exclusive lock on `<workdir>/.lock` for the life of the run, so a second run
pointed at the same directory stops at once with one line naming the holder. A run that is
refused before it claims the directory (a changed config on resume) leaves it as it was,
the lock file's line included. Default
directories get a unique name. Files are written atomically (a temporary file, then a
rename) as standard JSON: non-finite numbers become null.
"""

import contextlib
import datetime
import fcntl
import json
import math
import os
import socket
import sys
import tempfile
import threading

import numpy as np

from cljax.errors import ConfigError

LOCK_NAME = ".lock"
METRICS_NAME = "metrics.json"


def default_path(dataset: str, strategy: str, root: str = "runs") -> str:
    """A new directory under `root` named by the time, dataset and strategy (see
    `unique_directory`)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return unique_directory(root, f"{stamp}-{dataset}-{strategy}", "--workdir")


def unique_directory(root: str, name: str, flag: str) -> str:
    """A new directory `<root>/<name>`, made unique (with -2, -3, ...) against others of the
    same name, such as runs started in the same second; it is created here. `flag` names
    the command-line flag that would choose another directory."""
    base = os.path.join(root, name)
    for attempt in range(1, 1000):
        path = base if attempt == 1 else f"{base}-{attempt}"
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
        except OSError as error:
            raise ConfigError(
                f"cannot create a directory under {root}/ ({error.strerror}); pass"
                f" {flag}=DIR in a directory you can write to"
            ) from None
    raise ConfigError(f"{base} and 998 variants exist already; pass {flag}=DIR")


def ensure_writable(path: str, field: str) -> None:
    """Creates directory `path` if needed and proves it writable, else a `ConfigError`
    naming `field` (the flag or config field that gave it)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"{field}={path} is not writable ({error.strerror}); give a directory you can write to"
        ) from None


class Workdir:
    """The directory of one run. Use as a context manager: `open` on entry, `close` on exit."""

    def __init__(self, path: str, is_main: bool = True, created: bool = False):
        """`created`: the directory was made for this run (by `default_path`)."""
        self.path = path
        self.is_main = is_main
        self._created = created
        self._lock_file = None
        self._previous_holder: str | None = None
        self.claimed = False

    def open(self) -> "Workdir":
        """Creates the directory if needed, checks it is writable, and (process 0) locks
        it for this run; refuses a directory that holds another run's results."""
        self._created = self._created or not os.path.exists(self.path)
        ensure_writable(self.path, "workdir")
        if self.is_main:
            self._lock()
            earlier = self.earlier_metrics()
            if earlier is not None and earlier.get("status") == "finished":
                self.close()
                raise ConfigError(
                    f"workdir={self.path} already holds {METRICS_NAME} of a finished run;"
                    " pass a new --workdir or remove it"
                )
        return self

    def earlier_metrics(self) -> dict | None:
        """metrics.json of a run that used this directory before (None if there is none);
        an unfinished one is resumed from its checkpoints."""
        try:
            with open(self.file(METRICS_NAME)) as file:
                return json.load(file)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"status": "unreadable"}

    def _lock(self) -> None:
        self._lock_file = open(self.file(LOCK_NAME), "a+")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "another process"
            self._lock_file.close()
            self._lock_file = None
            raise ConfigError(
                f"workdir={self.path} is in use by {holder}; wait for that run to end or pass"
                " another --workdir"
            ) from None
        self._lock_file.seek(0)
        self._previous_holder = self._lock_file.read()
        self._lock_file.truncate(0)
        started = datetime.datetime.now().isoformat(timespec="seconds")
        self._lock_file.write(
            f"process {os.getpid()} on {socket.gethostname()} (started {started}:"
            f" {' '.join(sys.argv)})"
        )
        self._lock_file.flush()

    def close(self) -> None:
        """Releases the lock; removes the directory if this run created it and left it
        empty (a run that stopped on bad input leaves nothing behind); gives the lock file
        back its earlier line if this run never claimed the directory."""
        if self._lock_file is not None:
            if not self.claimed and self._previous_holder:
                self._lock_file.truncate(0)
                self._lock_file.write(self._previous_holder)
                self._lock_file.flush()
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
            if self._created and set(os.listdir(self.path)) <= {LOCK_NAME}:
                os.remove(self.file(LOCK_NAME))
                os.rmdir(self.path)

    def __enter__(self) -> "Workdir":
        return self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def claim(self) -> None:
        """Marks the directory as this run's: its lock file keeps this run's line."""
        self.claimed = True

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_json(self, name: str, content: dict) -> None:
        """Writes `content` atomically as standard JSON (non-finite numbers as null),
        through a temporary file of this thread's own (the watchdog's thread may write
        metrics.json while the training loop does)."""
        self.claim()
        path = self.file(name)
        temporary = f"{path}.{threading.get_ident()}.tmp"
        try:
            with open(temporary, "w") as file:
                json.dump(finite(content), file, indent=2, allow_nan=False)
            os.replace(temporary, path)
        except OSError:
            with contextlib.suppress(OSError):  # the full disk keeps the last complete file
                os.remove(temporary)
            raise


def finite(value):
    """`value` with every non-finite number replaced by None, NumPy scalars as Python's."""
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
