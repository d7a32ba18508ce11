"""What cljax derives from datasets and keeps between runs: indexes (labels, file lists) and
decoded images.

An index is computed once and stored under `$CLJAX_CACHE_DIR` (default `~/.cache/cljax`)
with the signature of what it was derived from (paths, sizes and modification times); a
later run whose signature matches reads it back instead of scanning a folder or every record
again. A cache that cannot be written is not an error: the run only starts slower next time.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np

Arrays = dict[str, np.ndarray]
STAMP_NAME = "stamp.json"


def cache_dir() -> str:
    return os.environ.get("CLJAX_CACHE_DIR") or os.path.expanduser("~/.cache/cljax")


def signature(paths: list[str]) -> str:
    """What decides whether an index is stale: each path's size and modification time."""
    stats = []
    for path in paths:
        info = os.stat(path)
        stats.append((path, info.st_size, info.st_mtime_ns))
    return json.dumps(stats)


def cached(kind: str, key: str, stamp: str, compute: Callable[[], Arrays]) -> Arrays:
    """The arrays `compute()` returns for `key`, read from the cache when stored with the
    same `stamp` (a `signature`), else computed and stored.

    Each array is a `.npy` file mapped into memory read-only, so that a run reads only the
    pages it touches (a decoded MNIST, 55 MB, loaded in 0.08 s from one `.npz`; mapped, in
    a millisecond)."""
    folder = os.path.join(cache_dir(), kind)
    path = os.path.join(folder, hashlib.sha256(key.encode()).hexdigest()[:32])
    try:
        with open(os.path.join(path, STAMP_NAME)) as file:
            stored = json.load(file)
        if stored["stamp"] == stamp:
            return {
                name: np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r")
                for name in stored["arrays"]
            }
    except (OSError, KeyError, ValueError):
        pass
    arrays = compute()
    with contextlib.suppress(OSError):
        _store(folder, path, stamp, arrays)
    return arrays


def _store(folder: str, path: str, stamp: str, arrays: Arrays) -> None:
    """Writes `arrays` to a new folder, then puts it at `path` (a stale one set aside and
    removed): a reader sees a whole entry or none."""
    os.makedirs(folder, exist_ok=True)
    new = tempfile.mkdtemp(dir=folder)
    try:
        for name, array in arrays.items():
            np.save(os.path.join(new, f"{name}.npy"), array, allow_pickle=False)
        with open(os.path.join(new, STAMP_NAME), "w") as file:
            json.dump({"stamp": stamp, "arrays": list(arrays)}, file)
    except OSError:  # a full disk: no half-written entry left
        shutil.rmtree(new, ignore_errors=True)
        raise
    if os.path.exists(path):
        stale = tempfile.mkdtemp(dir=folder)
        os.replace(path, os.path.join(stale, "entry"))
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(new, path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(path + ".npz")  # the same entry in the format before (one file)
