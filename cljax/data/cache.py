"""Indexes cljax derives from datasets and keeps between runs (labels, file lists).

An index is computed once and stored under `$CLJAX_CACHE_DIR` (default `~/.cache/cljax`)
with the signature of what it was derived from (paths, sizes and modification times); a
later run whose signature matches reads it back instead of scanning a folder or every record
again. A cache that cannot be written is not an error: the run only starts slower next time.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable

import numpy as np

Arrays = dict[str, np.ndarray]


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
    same `stamp` (a `signature`), else computed and stored."""
    folder = os.path.join(cache_dir(), kind)
    path = os.path.join(folder, hashlib.sha256(key.encode()).hexdigest()[:32] + ".npz")
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["stamp"]) == stamp:
                return {name: stored[name] for name in stored.files if name != "stamp"}
    except (OSError, KeyError, ValueError):
        pass
    arrays = compute()
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".npz", delete=False) as file:
            np.savez(file, stamp=np.asarray(stamp), **arrays)
        os.replace(file.name, path)
    except OSError:
        pass
    return arrays
